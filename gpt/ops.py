"""The model's compute, as XLA's own ops: what GPUs and TPUs run, and the reference that any
faster version is tested against.

The model receives these as one bundle, `Ops`, the way Flax's layers take `dot_general` or
`attention_fn`: a platform's kernels (gpt/cpu/) replace members of the bundle; nothing in a
layer branches on where it runs. Every member is a pure function of arrays.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

# model.attention="auto" is cuDNN's fused attention where a step is lowered for an NVIDIA GPU with
# cuDNN installed, Pallas' splash attention where it is lowered for a TPU, "xla" elsewhere and
# wherever a kernel does not apply (attention dropout, a KV cache, a head width or dtype it lacks).
SPLASH_HEAD_DIMS = (64, 128, 256)  # widths the TPU kernel tiles efficiently
SPLASH_BLOCK = 128  # the TPU kernel's query and key blocks (its lane width): T a multiple


def split_heads(qkv_BxTx3D, n_head: int):
    """c_attn's output -> q, k, v, each B x T x H x K."""
    B, T, width = qkv_BxTx3D.shape
    return (a.reshape(B, T, n_head, width // (3 * n_head)) for a in jnp.split(qkv_BxTx3D, 3, -1))


def _attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, visible_BxTxS, dropout):
    """softmax(q k^T / sqrt(K)) v over the visible keys; scores and softmax in float32."""
    scores_BxHxTxS = jnp.einsum("bqhk,bshk->bhqs", q_BxTxHxK, k_BxSxHxK)
    scores_BxHxTxS = scores_BxHxTxS.astype(jnp.float32) / math.sqrt(q_BxTxHxK.shape[-1])
    scores_BxHxTxS = jnp.where(visible_BxTxS[:, None], scores_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(q_BxTxHxK.dtype)
    if dropout is not None:
        probs_BxHxTxS = dropout(probs_BxHxTxS)
    return jnp.einsum("bhqs,bshk->bqhk", probs_BxHxTxS, v_BxSxHxK)


def xla_causal_attention(qkv_BxTx3D, *, n_head: int, block: int = 0, dropout=None):
    """Causal attention in einsums. With 0 < block < T (T a multiple of it), queries go in
    blocks and block i sees keys [0, (i + 1) * block) only: the fully masked score blocks above
    the diagonal are never computed (3/8 of them with 4 blocks)."""
    q, k, v = split_heads(qkv_BxTx3D, n_head)
    B, T = qkv_BxTx3D.shape[:2]
    visible_1xTxT = jnp.tril(jnp.ones((T, T), dtype=bool))[None]
    if not (0 < block < T and T % block == 0):
        block = T
    out_BxTxHxK = jnp.concatenate([_attend(
        q[:, i:i + block], k[:, :i + block], v[:, :i + block],
        visible_1xTxT[:, i:i + block, :i + block], dropout) for i in range(0, T, block)], axis=1)
    return out_BxTxHxK.reshape(B, T, -1)


def cudnn_causal_attention(qkv_BxTx3D, *, n_head: int):
    """cuDNN's fused (flash) attention: NVIDIA GPUs with cuDNN, float16 or bfloat16."""
    q, k, v = split_heads(qkv_BxTx3D, n_head)
    out_BxTxHxK = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return out_BxTxHxK.reshape(*qkv_BxTx3D.shape[:2], -1)


def splash_causal_attention(qkv_BxTx3D, *, n_head: int, interpret: bool = False):
    """Pallas' splash attention for TPU (jax.experimental.pallas.ops.tpu). `interpret` runs
    the kernel's Pallas program on any backend, for tests."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (splash_attention_kernel,
                                                                  splash_attention_mask)
    q, k, v = (a.transpose(0, 2, 1, 3) for a in split_heads(qkv_BxTx3D, n_head))  # B x H x T x K
    B, H, T, K = q.shape
    mask = splash_attention_mask.MultiHeadMask(
        [splash_attention_mask.CausalMask((T, T)) for _ in range(H)])
    block = SPLASH_BLOCK
    sizes = splash_attention_kernel.BlockSizes(
        block_q=block, block_kv_compute=block, block_kv=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash_attention_kernel.make_splash_mha(
        mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    out_BxHxTxK = jax.vmap(kernel)(q * (1.0 / math.sqrt(K)), k, v)
    return out_BxHxTxK.transpose(0, 2, 1, 3).reshape(B, T, H * K)


def splash_applies(T: int, head_dim: int) -> bool:
    return head_dim in SPLASH_HEAD_DIMS and T % SPLASH_BLOCK == 0


def cudnn_available() -> bool:
    """Whether cuDNN can be traced here: jax raises 'cuDNN is not detected' at trace time on a
    host without the CUDA plugin, so on such a host `auto` lowers for GPUs with xla."""
    from jax._src.cudnn import fused_attention_stablehlo
    return fused_attention_stablehlo.cuda_versions is not None


def causal_attention(qkv_BxTx3D, *, n_head: int, implementation: str = "auto", block: int = 0,
                     dropout=None):
    """Causal self-attention over c_attn's output [B, T, 3D] -> the heads' outputs [B, T, D].
    `dropout` (probabilities -> probabilities) applies attention dropout; only xla has it."""
    xla = lambda x: xla_causal_attention(x, n_head=n_head, block=block, dropout=dropout)  # noqa: E731
    if implementation == "xla" or dropout is not None:
        return xla(qkv_BxTx3D)
    if implementation == "cudnn":
        return cudnn_causal_attention(qkv_BxTx3D, n_head=n_head)
    if implementation == "splash":
        return splash_causal_attention(qkv_BxTx3D, n_head=n_head)
    T, head_dim = qkv_BxTx3D.shape[1], qkv_BxTx3D.shape[2] // (3 * n_head)
    per_platform = {}
    if qkv_BxTx3D.dtype in (jnp.bfloat16, jnp.float16) and cudnn_available():
        per_platform["cuda"] = lambda x: cudnn_causal_attention(x, n_head=n_head)
    if splash_applies(T, head_dim):
        per_platform["tpu"] = lambda x: splash_causal_attention(x, n_head=n_head)
    if not per_platform:
        return xla(qkv_BxTx3D)
    return lax.platform_dependent(qkv_BxTx3D, default=xla, **per_platform)


def cached_attention(qkv_BxTx3D, cache, positions_BxT, *, n_head: int):
    """Attention with a KV cache ((k, v), each B x L x H x K): this call's keys and values are
    written at `positions_BxT` first, and each query attends to the slots at or before its
    position. Returns (out [B, T, D], the updated cache)."""
    q, k, v = split_heads(qkv_BxTx3D, n_head)
    rows_Bx1 = jnp.arange(q.shape[0])[:, None]
    k_BxSxHxK = cache[0].at[rows_Bx1, positions_BxT].set(k.astype(cache[0].dtype))
    v_BxSxHxK = cache[1].at[rows_Bx1, positions_BxT].set(v.astype(cache[1].dtype))
    visible_BxTxS = jnp.arange(k_BxSxHxK.shape[1])[None, None, :] <= positions_BxT[:, :, None]
    out_BxTxHxK = _attend(q, k_BxSxHxK, v_BxSxHxK, visible_BxTxS, None)
    return out_BxTxHxK.reshape(*qkv_BxTx3D.shape[:2], -1), (k_BxSxHxK, v_BxSxHxK)


def tied_head_logits(h_BxTxD, table_VxD):
    """h @ table.T with the table's rows contracted as stored: decoding one token then reads
    the table in order rather than transposed."""
    return jnp.einsum("...d,vd->...v", h_BxTxD, table_VxD)


def nll(logits_BxTxV, labels_BxT):
    """-log softmax(logits)[label], in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV.astype(jnp.float32), labels_BxT.astype(jnp.int32))


def tied_head_nll(h_BxTxD, table_VxD, labels_BxT):
    """nll of the tied head's logits: one op, so that a kernel may fuse the head and the loss."""
    return nll(tied_head_logits(h_BxTxD, table_VxD), labels_BxT)


@dataclasses.dataclass(frozen=True)
class Ops:
    """Everything the model computes that a platform may do faster, with XLA's versions as
    defaults. `adamw`, when set, replaces optax's clip + AdamW update (gpt.optim) with one that
    keeps optax's state and arithmetic."""

    dot_general: Callable = lax.dot_general  # nn.Dense's products
    causal_attention: Callable = causal_attention
    cached_attention: Callable = cached_attention
    tied_head_logits: Callable = tied_head_logits
    tied_head_nll: Callable = tied_head_nll
    nll: Callable = nll
    adamw: Callable | None = None  # (optax's transformation, optim config, schedule) -> its fused twin


REFERENCE = Ops()
