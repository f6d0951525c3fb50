"""The programs (`python -m experiments.NAME`).

A program started that way first tunes the CPU runtime for itself (never for a process, such
as pytest or a notebook, that merely imports this package), as measured with `make bench`:
- XLA's CPU matmuls go to oneDNN instead of its default YNNPACK fusions (CPU_XLA_FLAGS): the
  train step ran 15-20% faster at both benchmark shapes. Flags already in XLA_FLAGS win.
- On Linux, where the kernel grants transparent huge pages only on request ("madvise"), it
  re-executes itself once with glibc's malloc asking for them (GLIBC_TUNABLES=
  glibc.malloc.hugetlb=1). XLA allocates a step's temporaries afresh every step; with 4 KiB
  pages each one is faulted in again (`make bench` prints the faults per step). Set
  GLIBC_TUNABLES yourself (e.g. glibc.malloc.hugetlb=0) to opt out. The benchmark's peer
  inherits the same environment, so its ratios compare like with like.
"""
import os
import sys

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_use_onednn=true",
                 "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
TUNABLE = "glibc.malloc.hugetlb"


def _wants_huge_pages() -> bool:
    if not sys.platform.startswith("linux") or TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


def _tune_runtime():
    xla_flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join([xla_flags] + [
        f for f in CPU_XLA_FLAGS if f.split("=")[0] not in xla_flags]).strip()
    if _wants_huge_pages():
        tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
        os.environ["GLIBC_TUNABLES"] = ":".join(tunables + [f"{TUNABLE}=1"])
        os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])


# While `-m` locates the module, argv[0] is "-m": only a program started that way is tuned.
if sys.argv[:1] == ["-m"]:
    _tune_runtime()
