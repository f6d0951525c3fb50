"""Softmax cross-entropy with integer labels, fused into one pass over the logits on CPU.

On XLA's CPU backend the loss and its gradient over GPT-2's 50,257-way logits cost about as
much as the head's three matmuls at small widths: XLA makes about six passes over the
[tokens, vocab] matrix (max, exp, sum; then the softmax times the incoming gradient, the one-hot
subtraction, and a transposed copy for the table's gradient). `cross_entropy.cc` reads the
logits once forward, writing the softmax over them, and once backward, writing the gradient
over the softmax and, for a tied head (`tied_head_nll`), its transpose. `nll` and
`tied_head_nll` wrap gpt.ops' versions, which run wherever a step is not lowered for CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gpt.cpu import matmul

_LOSS, _FORWARD = "gpt_cross_entropy", "gpt_cross_entropy_fwd"
_BACKWARD, _BACKWARD_T = "gpt_cross_entropy_bwd", "gpt_cross_entropy_bwd_t"


@jax.named_scope("cross_entropy")  # for profiles (tools/op_profile.py)
def _nll_and_softmax(logits_NxV, labels_N):
    """The loss and, in the logits' buffer, their softmax."""
    return jax.ffi.ffi_call(
        _FORWARD, (jax.ShapeDtypeStruct(labels_N.shape, jnp.float32),
                   jax.ShapeDtypeStruct(logits_NxV.shape, jnp.float32)),
        vmap_method="broadcast_all", input_output_aliases={0: 1})(logits_NxV, labels_N)


@jax.named_scope("cross_entropy")
def _gradient(softmax_NxV, labels_N, g_N, transposed: bool = False):
    """g (softmax - onehot) in the softmax's buffer; with `transposed`, its transpose too."""
    shapes = [jax.ShapeDtypeStruct(softmax_NxV.shape, jnp.float32)]
    if transposed:
        shapes.append(jax.ShapeDtypeStruct(softmax_NxV.shape[::-1], jnp.float32))
    # Under vmap, the transpose of stacked rows is not a stack of transposes: one call a slice.
    outputs = jax.ffi.ffi_call(_BACKWARD_T if transposed else _BACKWARD, tuple(shapes),
                               vmap_method="sequential" if transposed else "broadcast_all",
                               input_output_aliases={0: 0})(
        softmax_NxV, labels_N, g_N)
    return outputs if transposed else outputs[0]


@jax.custom_vjp
@jax.named_scope("cross_entropy")
def _fused(logits_NxV, labels_N):
    nll = jax.ShapeDtypeStruct(labels_N.shape, jnp.float32)
    return jax.ffi.ffi_call(_LOSS, nll, vmap_method="broadcast_all")(logits_NxV, labels_N)


def _fused_forward(logits_NxV, labels_N):
    nll_N, softmax_NxV = _nll_and_softmax(logits_NxV, labels_N)
    return nll_N, (softmax_NxV, labels_N)


def _fused_backward(residuals, g_N):
    softmax_NxV, labels_N = residuals
    return _gradient(softmax_NxV, labels_N, g_N), None


_fused.defvjp(_fused_forward, _fused_backward)


@jax.named_scope("tied_head")
def _head_logits(h_NxD, table_VxD, mkl: bool):
    """The table's rows contracted as stored."""
    if mkl:
        return matmul.over_rows(h_NxD, table_VxD, transpose_w=True)
    return jnp.einsum("...d,vd->...v", h_NxD, table_VxD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_head(h_NxD, table_VxD, labels_N, mkl: bool):
    return _fused(_head_logits(h_NxD, table_VxD, mkl), labels_N)


def _fused_head_forward(h_NxD, table_VxD, labels_N, mkl):
    nll_N, softmax_NxV = _nll_and_softmax(_head_logits(h_NxD, table_VxD, mkl), labels_N)
    return nll_N, (softmax_NxV, h_NxD, table_VxD, labels_N)


def _fused_head_backward(mkl, residuals, g_N):
    softmax_NxV, h_NxD, table_VxD, labels_N = residuals
    if mkl:  # MKL reads the gradient transposed at speed
        dlogits_NxV = _gradient(softmax_NxV, labels_N, g_N)
        with jax.named_scope("tied_head"):
            return (matmul.matmul(dlogits_NxV, table_VxD),
                    matmul.matmul(dlogits_NxV, h_NxD, True, False), None)
    dlogits_NxV, dlogits_VxN = _gradient(softmax_NxV, labels_N, g_N, transposed=True)
    with jax.named_scope("tied_head"):
        return dlogits_NxV @ table_VxD, dlogits_VxN @ h_NxD, None


_fused_head.defvjp(_fused_head_forward, _fused_head_backward)


def _rows(logits_NxV, labels_N):
    """The fused loss over any leading shape, as rows: the head's matmul makes them so, and XLA
    then hands its buffer over uncopied."""
    labels_N = labels_N.astype(jnp.int32)
    return _fused(logits_NxV.astype(jnp.float32).reshape(-1, logits_NxV.shape[-1]),
                  labels_N.reshape(-1)).reshape(labels_N.shape)


def _tied_rows(h_NxD, table_VxD, labels_N, mkl: bool):
    """The fused head and loss over any leading shape of h. The table's gradient reads a
    transpose of the logits' gradient that the kernel writes while it has each tile in cache,
    not one XLA copies out afterwards; with MKL, the head's products run on it."""
    return _fused_head(h_NxD.reshape(-1, h_NxD.shape[-1]), table_VxD,
                       labels_N.astype(jnp.int32).reshape(-1), mkl).reshape(labels_N.shape)


def nll(reference):
    """`reference` (gpt.ops.nll) as the fused kernel where a step is lowered for CPU."""
    return lambda logits, labels: jax.lax.platform_dependent(
        logits, labels, cpu=_rows, default=reference)


def tied_head_nll(reference, mkl: bool):
    """`reference` (gpt.ops.tied_head_nll) as the fused head and loss where a step is lowered
    for CPU in float32; `mkl`: the head's products on MKL (matmul.loaded())."""

    def head_nll(h_NxD, table_VxD, labels_N):
        if not h_NxD.dtype == table_VxD.dtype == jnp.float32:
            return reference(h_NxD, table_VxD, labels_N)
        return jax.lax.platform_dependent(h_NxD, table_VxD, labels_N, default=reference,
                                          cpu=functools.partial(_tied_rows, mkl=mkl))

    return head_nll
