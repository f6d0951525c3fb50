"""Causal self-attention as one fused CPU kernel forward and one backward (attention.cc).

XLA's attention on CPU slices q, k and v out of c_attn's output, transposes them per head, and
writes every head's [T, T] scores and probabilities to memory, reading them back for the
softmax, the second matmul and the backward. The kernel works in 64 x 64 tiles that stay in
cache with an online softmax (flash attention), skips the tiles above the diagonal, reads q, k
and v where c_attn wrote them and writes its output where c_proj reads it. It serves causal
attention without a cache in float32 without attention dropout (`causal_attention`).

Sampling's steps, one new token per row, use `decode`, a third kernel: it writes the token's
key and value into the KV caches in place and attends over them. With XLA's ops, the cache
update and the two products made XLA copy every layer's caches at every new token
(docs/performance.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gpt.cpu import build

HEAD_DIMS = (16, 32, 64, 128)  # the widths attention.cc is compiled for


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def causal_self_attention(qkv_BxTx3D: jax.Array, n_head: int) -> jax.Array:
    """softmax(q k^T / sqrt(K), causal) v for c_attn's float32 output [..., T, 3 * D], q, k and v
    each n_head heads of K = D / n_head; the heads' outputs concatenated, [..., T, D]."""
    return _forward(qkv_BxTx3D, n_head)[0]


@jax.named_scope("attention")  # for profiles (tools/op_profile.py)
def _forward(qkv_BxTx3D, n_head):
    build.require("attention")
    *batch, t, width = qkv_BxTx3D.shape
    return jax.ffi.ffi_call(
        "gpt_attention_fwd", (jax.ShapeDtypeStruct((*batch, t, width // 3), jnp.float32),
                              jax.ShapeDtypeStruct((*batch, n_head, t), jnp.float32)),
        vmap_method="broadcast_all")(qkv_BxTx3D, heads=np.int64(n_head))


def _forward_with_residuals(qkv_BxTx3D, n_head):
    out_BxTxD, lse_BxHxT = _forward(qkv_BxTx3D, n_head)
    return out_BxTxD, (qkv_BxTx3D, out_BxTxD, lse_BxHxT)


@jax.named_scope("attention")
def _backward(n_head, residuals, dout_BxTxD):
    qkv_BxTx3D, out_BxTxD, lse_BxHxT = residuals
    dqkv = jax.ffi.ffi_call("gpt_attention_bwd", jax.ShapeDtypeStruct(qkv_BxTx3D.shape, jnp.float32),
                            vmap_method="broadcast_all")(
        qkv_BxTx3D, out_BxTxD, lse_BxHxT, dout_BxTxD.astype(jnp.float32), heads=np.int64(n_head))
    return (dqkv,)


causal_self_attention.defvjp(_forward_with_residuals, _backward)


@jax.named_scope("attention")
def decode(qkv_Bx1x3D: jax.Array, cache: tuple, positions_Bx1: jax.Array, n_head: int):
    """One new token per row while sampling: (out [B, 1, D], cache) for c_attn's float32 output,
    the (k, v) caches (B x L x H x K, updated in place) and the tokens' positions, which must lie
    in the cache. Any head width serves."""
    k_cache, v_cache = cache
    out, k_cache, v_cache = jax.ffi.ffi_call(
        "gpt_attention_decode",
        (jax.ShapeDtypeStruct((*qkv_Bx1x3D.shape[:2], qkv_Bx1x3D.shape[2] // 3), jnp.float32),
         jax.ShapeDtypeStruct(k_cache.shape, jnp.float32), jax.ShapeDtypeStruct(v_cache.shape, jnp.float32)),
        input_output_aliases={1: 1, 2: 2})(
        qkv_Bx1x3D, k_cache, v_cache, positions_Bx1.astype(jnp.int32), heads=np.int64(n_head))
    return out, (k_cache, v_cache)


def causal_attention(reference):
    """`reference` (gpt.ops.causal_attention) with the kernel where a step is lowered for CPU and
    the kernel applies."""

    def attend(qkv_BxTx3D, *, n_head, implementation="auto", block=0, dropout=None):
        fallback = functools.partial(reference, n_head=n_head, implementation=implementation,
                                     block=block, dropout=dropout)
        if (dropout is not None or implementation not in ("auto", "xla")
                or qkv_BxTx3D.dtype != jnp.float32 or qkv_BxTx3D.shape[-1] // (3 * n_head) not in HEAD_DIMS):
            return fallback(qkv_BxTx3D)
        return jax.lax.platform_dependent(
            qkv_BxTx3D, cpu=lambda x: causal_self_attention(x, n_head), default=fallback)

    return attend


def cached_attention(reference):
    """`reference` (gpt.ops.cached_attention) with `decode` for one new float32 token per row
    where a step is lowered for CPU."""

    def attend(qkv_BxTx3D, cache, positions_BxT, *, n_head):
        fallback = functools.partial(reference, n_head=n_head)
        if not (qkv_BxTx3D.shape[1] == 1 and qkv_BxTx3D.dtype == cache[0].dtype == jnp.float32):
            return fallback(qkv_BxTx3D, cache, positions_BxT)
        return jax.lax.platform_dependent(
            qkv_BxTx3D, cache, positions_BxT, default=fallback,
            cpu=lambda qkv, kv, positions: decode(qkv, kv, positions, n_head))

    return attend
