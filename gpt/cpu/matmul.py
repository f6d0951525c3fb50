"""Float32 matrix products on Intel MKL's sgemm on CPU (matmul.cc), forward and backward.

On 2 cores, the GPT-2 small step's matrix products (forward, input and weight gradients, the
tied head's three) summed to 6.92 s of best times on XLA's oneDNN dots, 6.03 s on this kernel
and 6.15 s on torch, which calls MKL too (tools/matmul_ab.py; README, Performance). The kernel
calls MKL single-threaded on one block of the product per thread of XLA's own pool, so that
products XLA runs side by side share its threads rather than each starting an OpenMP team.

The model's dense layers (`dot_general`, for nn.Dense) and tied head use `matmul` where a step
is lowered for CPU in float32 with MKL loaded (the `mkl` package is installed on x86-64 Linux
only); XLA's dot otherwise.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging

import jax
import jax.numpy as jnp
from jax import lax

from gpt.cpu import build

_SEQUENTIAL = 1  # MKL_THREADING_SEQUENTIAL


def _mkl_library() -> str | None:
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    paths = [f.locate() for f in files if f.name.startswith("libmkl_rt.so")]
    return str(paths[0]) if paths else None


@functools.cache
def loaded() -> bool:
    """Whether MKL's sgemm is loaded into the kernels (once a process)."""
    kernels, path = build.library(), _mkl_library()
    if kernels is None or path is None:
        return False
    try:
        mkl = ctypes.CDLL(path)
        if mkl.MKL_Set_Threading_Layer(_SEQUENTIAL) != _SEQUENTIAL:
            raise OSError("MKL is already running threaded in this process")
        sgemm = ctypes.cast(mkl.cblas_sgemm_64, ctypes.c_void_p)
    except (OSError, AttributeError) as e:
        logging.warning("MKL unusable (%s), matmuls stay XLA's: %s", path, e)
        return False
    kernels.GptSetSgemm(sgemm)
    return True


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False,
           transpose_b: bool = False) -> jax.Array:
    """op(a) @ op(b) in float32, op transposing the last two axes where asked; leading axes are
    a batch, equal in both. Needs `loaded()`."""
    m = a.shape[-1] if transpose_a else a.shape[-2]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    with jax.named_scope("matmul"):  # for profiles (tools/op_profile.py)
        return jax.ffi.ffi_call("gpt_matmul", jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.float32),
                                vmap_method="broadcast_all")(
            a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def _forward(a, b, transpose_a, transpose_b):
    return matmul(a, b, transpose_a, transpose_b), (a, b)


def _backward(transpose_a, transpose_b, residuals, g):
    """With C = op(a) op(b): dop(a) = G op(b)^T and dop(b) = op(a)^T G, each written as one
    product of a, b and G as stored."""
    a, b = residuals
    da = matmul(b, g, transpose_b, True) if transpose_a else matmul(g, b, False, not transpose_b)
    db = matmul(g, a, True, transpose_a) if transpose_b else matmul(a, g, not transpose_a, False)
    return da, db


matmul.defvjp(_forward, _backward)


def _is_dense(lhs, rhs, dimension_numbers, preferred_element_type) -> bool:
    """x [..., K] @ kernel [K, N] in float32: nn.Dense's product."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    return (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
            and rhs.ndim == 2 and batch == ((), ()) and lhs.dtype == rhs.dtype == jnp.float32
            and preferred_element_type in (None, jnp.float32))


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """lax.dot_general for nn.Dense(dot_general=...): where a step is lowered for CPU, a dense
    float32 product as one `matmul` of x's rows; anything else as lax.dot_general."""
    xla = functools.partial(lax.dot_general, dimension_numbers=dimension_numbers,
                            precision=precision, preferred_element_type=preferred_element_type)
    if not _is_dense(lhs, rhs, dimension_numbers, preferred_element_type):
        return xla(lhs, rhs)
    return lax.platform_dependent(lhs, rhs, cpu=over_rows, default=xla)


def over_rows(x: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
    """x [..., K] @ op(w), op(w) [K, N], as one `matmul` of x's rows."""
    n = w.shape[0] if transpose_w else w.shape[1]
    return matmul(x.reshape(-1, x.shape[-1]), w, False, transpose_w).reshape(*x.shape[:-1], n)


def tied_head_logits(reference):
    """`reference` (gpt.ops.tied_head_logits) as one `matmul` where a step is lowered for CPU."""

    def logits(h_BxTxD, table_VxD):
        if not h_BxTxD.dtype == table_VxD.dtype == jnp.float32:
            return reference(h_BxTxD, table_VxD)
        return lax.platform_dependent(h_BxTxD, table_VxD, default=reference,
                                      cpu=lambda h, w: over_rows(h, w, transpose_w=True))

    return logits
