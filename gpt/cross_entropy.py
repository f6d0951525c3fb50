"""Softmax cross-entropy with integer labels, fused into one pass over the logits on CPU.

On XLA's CPU backend the loss and its gradient over GPT-2's 50,257-way logits cost about as
much as the head's three matmuls at small widths: XLA makes about six passes over the
[tokens, vocab] matrix (max, exp, sum; then the softmax times the incoming gradient, the one-hot
subtraction and a transposed copy). `cross_entropy.cc` is one pass forward and one backward,
run as XLA FFI custom calls on XLA's own thread pool. It is compiled on first use with the
machine's C++ compiler into a cache directory; without one, or on GPU and TPU, the same
function is optax's, which XLA fuses well there. GPT_JAX_FUSED_CE=0 in the environment also
selects optax's, for comparison.
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
import jax.numpy as jnp
import jaxlib
import optax

_SOURCE = pathlib.Path(__file__).with_suffix(".cc")
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-fno-trapping-math"]
_LOSS, _FORWARD, _BACKWARD = "gpt_cross_entropy", "gpt_cross_entropy_fwd", "gpt_cross_entropy_bwd"


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "gpt-jax"


def build() -> pathlib.Path:
    """Compiles cross_entropy.cc once per source, jaxlib version and compiler; concurrent
    builders each write a temporary file and the last rename wins."""
    compiler = os.environ.get("CXX", "c++")
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), jaxlib.__version__, compiler, *_FLAGS])
                         .encode()).hexdigest()[:16]
    library = _cache_dir() / f"cross_entropy-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
        os.close(fd)
        try:
            subprocess.run([compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE),
                            "-o", partial], check=True, capture_output=True, text=True)
            os.replace(partial, library)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return library


@functools.cache
def fused_available() -> bool:
    """Whether the fused kernel is built and registered with XLA's CPU backend (once a process)."""
    try:
        library = ctypes.CDLL(str(build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logging.warning("fused cross-entropy unavailable, using XLA's: %s", detail.strip()[-500:])
        return False
    for name, symbol in [(_LOSS, library.GptCrossEntropy), (_FORWARD, library.GptCrossEntropyFwd),
                         (_BACKWARD, library.GptCrossEntropyBwd)]:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return True


@jax.custom_vjp
def _fused(logits, labels):
    nll = jax.ShapeDtypeStruct(labels.shape, jnp.float32)
    return jax.ffi.ffi_call(_LOSS, nll, vmap_method="broadcast_all")(logits, labels)


def _fused_forward(logits, labels):
    nll, softmax = jax.ffi.ffi_call(
        _FORWARD, (jax.ShapeDtypeStruct(labels.shape, jnp.float32),
                   jax.ShapeDtypeStruct(logits.shape, jnp.float32)),
        vmap_method="broadcast_all", input_output_aliases={0: 1})(logits, labels)
    return nll, (softmax, labels)


def _fused_backward(residuals, g):
    softmax, labels = residuals
    dlogits = jax.ffi.ffi_call(_BACKWARD, jax.ShapeDtypeStruct(softmax.shape, jnp.float32),
                               vmap_method="broadcast_all",
                               input_output_aliases={0: 0})(softmax, labels, g)
    return dlogits, None


_fused.defvjp(_fused_forward, _fused_backward)


def softmax_cross_entropy(logits_NxV: jax.Array, labels_N: jax.Array, *,
                          fused: bool | None = None) -> jax.Array:
    """-log softmax(logits)[label] per row, in float32, over the last axis (any leading shape).

    fused=None uses the fused kernel when tracing for CPU, it is available and GPT_JAX_FUSED_CE
    is not 0; True insists.
    """
    logits_NxV = logits_NxV.astype(jnp.float32)
    labels_N = labels_N.astype(jnp.int32)
    if fused is None:
        fused = (os.environ.get("GPT_JAX_FUSED_CE", "1") != "0" and jax.default_backend() == "cpu"
                 and fused_available())
    elif fused and not fused_available():
        raise RuntimeError("the fused cross-entropy kernel could not be built (see the log)")
    if fused:  # as rows: the head's matmul makes them, and XLA then aliases its buffer
        return _fused(logits_NxV.reshape(-1, logits_NxV.shape[-1]), labels_N.reshape(-1)
                      ).reshape(labels_N.shape)
    return optax.softmax_cross_entropy_with_integer_labels(logits_NxV, labels_N)
