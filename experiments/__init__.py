"""The programs (`python -m experiments.NAME`).

On Linux, where the kernel grants transparent huge pages only on request ("madvise"), a
program started that way first re-executes itself once with glibc's malloc asking for them
(GLIBC_TUNABLES=glibc.malloc.hugetlb=1); a process that merely imports this package (pytest,
a notebook) is left alone. XLA allocates a CPU step's temporaries afresh every step, and with
4 KiB pages each is faulted in again: `make bench` prints the faults per step. Set
GLIBC_TUNABLES yourself (e.g. glibc.malloc.hugetlb=0) to opt out. The benchmark's peer
inherits the same environment, so its ratios compare like with like.
"""
import os
import sys

TUNABLE = "glibc.malloc.hugetlb"


def _wants_huge_pages() -> bool:
    if not sys.platform.startswith("linux") or TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


# While `-m` locates the module, argv[0] is "-m": only a program started that way re-executes.
if sys.argv[:1] == ["-m"] and _wants_huge_pages():
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    os.environ["GLIBC_TUNABLES"] = ":".join(tunables + [f"{TUNABLE}=1"])
    os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])
