"""Builds the C++ kernels (cross_entropy.cc, attention.cc, matmul.cc, adamw.cc) into one library
of XLA FFI custom calls for the CPU backend, compiled on first use with the machine's C++
compiler ($CXX, else c++) into a cache directory. Where it cannot be built, gpt.cpu.ops()
leaves XLA's ops in place.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import subprocess
import tempfile

import jax
import jaxlib

_HERE = pathlib.Path(__file__).parent
_SOURCES = [_HERE / name for name in ("cross_entropy.cc", "attention.cc", "matmul.cc", "adamw.cc")]
_HEADERS = [_HERE / "cpu_kernels.h"]
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-fno-trapping-math",
          "-fno-math-errno"]  # sqrt without a branch to set errno: its loops vectorise
# XLA's name for each custom call -> the handler symbol the library exports.
_TARGETS = {
    "gpt_cross_entropy": "GptCrossEntropy",
    "gpt_cross_entropy_fwd": "GptCrossEntropyFwd",
    "gpt_cross_entropy_bwd": "GptCrossEntropyBwd",
    "gpt_cross_entropy_bwd_t": "GptCrossEntropyBwdT",
    "gpt_attention_fwd": "GptAttentionFwd",
    "gpt_attention_bwd": "GptAttentionBwd",
    "gpt_attention_decode": "GptAttentionDecode",
    "gpt_matmul": "GptMatMul",
    "gpt_adamw": "GptAdamW",
}


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "gpt-jax"


def library_path() -> pathlib.Path:
    """Where the kernels' library is cached: one file per source, jaxlib version and compiler."""
    texts = [path.read_text() for path in _SOURCES + _HEADERS]
    key = hashlib.sha256("\0".join([*texts, jaxlib.__version__, _compiler(), *_FLAGS])
                         .encode()).hexdigest()[:16]
    return _cache_dir() / f"gpt_kernels-{key}.so"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def build() -> pathlib.Path:
    """Compiles the kernels once per source, jaxlib version and compiler; concurrent builders
    each write a temporary file and the last rename wins."""
    compiler = _compiler()
    library = library_path()
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
        os.close(fd)
        try:
            subprocess.run([compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES),
                            "-o", partial], check=True, capture_output=True, text=True)
            os.replace(partial, library)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return library


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels' library, built and registered with XLA's CPU backend (once a process);
    None where it cannot be built."""
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logging.warning("fused CPU kernels unavailable, using XLA's ops: %s", detail.strip()[-500:])
        return None
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return lib


def available() -> bool:
    """Whether the kernels are built and registered."""
    return library() is not None


def require(what: str) -> None:
    """Raises unless the kernels are built and registered."""
    if not available():
        raise RuntimeError(f"the fused {what} kernel could not be built (see the log)")
