"""The GPT-1 / GPT-2 decoder stack as Flax linen modules.

Parameter names follow the released checkpoints (wte, wpe, h_i/attn/c_attn, ...)
so conversion to and from them is a rename plus transposes, not a re-design.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt import attention, matmul
from gpt.config import GPTConfig
from gpt.cross_entropy import softmax_cross_entropy, tied_head_cross_entropy, tied_head_logits

ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # both papers' GELU
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep everything
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def _dense(cfg: GPTConfig, features: int, name: str, std: float | None = None) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=nn.initializers.normal(std if std is not None else cfg.init_std),
        bias_init=nn.initializers.zeros,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        dot_general=matmul.dot_general,
        name=name,
    )


def _layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
    # Flax computes LayerNorm statistics in at least float32 whatever the dtype.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, name=name)


class CausalSelfAttention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool, cache=None, positions_BxT=None):
        """Returns (out, cache). Without a cache (None): causal attention over x. With one
        ((k, v), each B x L x H x K): this call's keys and values are written at
        `positions_BxT` first, and each query attends to the slots at or before its position."""
        cfg = self.cfg
        B, T, _ = x_BxTxD.shape
        qkv_BxTx3D = _dense(cfg, 3 * cfg.d_model, "c_attn")(x_BxTxD)
        kernel = cfg.attention == "xla" and (deterministic or cfg.attn_pdrop == 0)  # no dropout
        if cache is None and kernel and attention.usable(cfg.head_dim, qkv_BxTx3D.dtype):
            out_BxTxD = attention.causal_self_attention(qkv_BxTx3D, cfg.n_head)
            return self._project(out_BxTxD, deterministic), None
        if (cache is not None and T == 1 and kernel and cache[0].dtype == jnp.float32
                and attention.usable(None, qkv_BxTx3D.dtype)):  # a sampling step
            out_BxTxD, cache = attention.decode(qkv_BxTx3D, cache, positions_BxT, cfg.n_head)
            return self._project(out_BxTxD, deterministic), cache
        q_BxTxHxK, k_BxSxHxK, v_BxSxHxK = (
            a.reshape(B, T, cfg.n_head, cfg.head_dim) for a in jnp.split(qkv_BxTx3D, 3, axis=-1))
        if cache is None:
            visible_BxTxS = jnp.tril(jnp.ones((T, T), dtype=bool))[None]
        else:
            rows_Bx1 = jnp.arange(B)[:, None]
            k_BxSxHxK = cache[0].at[rows_Bx1, positions_BxT].set(k_BxSxHxK.astype(cache[0].dtype))
            v_BxSxHxK = cache[1].at[rows_Bx1, positions_BxT].set(v_BxSxHxK.astype(cache[1].dtype))
            slots_S = jnp.arange(k_BxSxHxK.shape[1])
            visible_BxTxS = slots_S[None, None, :] <= positions_BxT[:, :, None]
        if cfg.attention == "dot_product":  # the backend's fused kernel where it has one
            out_BxTxHxK = jax.nn.dot_product_attention(
                q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, is_causal=cache is None,
                mask=None if cache is None else visible_BxTxS[:, None])
        elif cache is None and 0 < cfg.attention_block < T and T % cfg.attention_block == 0:
            # Queries in blocks: block i sees keys [0, (i+1) * block) only, so the fully masked
            # score blocks above the diagonal are never computed (3/8 of them with 4 blocks).
            block = cfg.attention_block
            out_BxTxHxK = jnp.concatenate([self._attend(
                q_BxTxHxK[:, i:i + block], k_BxSxHxK[:, :i + block], v_BxSxHxK[:, :i + block],
                visible_BxTxS[:, i:i + block, :i + block], deterministic)
                for i in range(0, T, block)], axis=1)
        else:
            out_BxTxHxK = self._attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, visible_BxTxS, deterministic)
        out_BxTxD = self._project(out_BxTxHxK.reshape(B, T, cfg.d_model), deterministic)
        return out_BxTxD, (None if cache is None else (k_BxSxHxK, v_BxSxHxK))

    def _project(self, heads_BxTxD, deterministic):
        """c_proj over the heads' concatenated outputs, then residual dropout."""
        out_BxTxD = _dense(self.cfg, self.cfg.d_model, "c_proj", self.cfg.residual_init_std)(heads_BxTxD)
        return nn.Dropout(self.cfg.resid_pdrop)(out_BxTxD, deterministic=deterministic)

    def _attend(self, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, visible_BxTxS, deterministic):
        cfg = self.cfg
        scores_BxHxTxS = jnp.einsum("bqhk,bshk->bhqs", q_BxTxHxK, k_BxSxHxK)
        scores_BxHxTxS = scores_BxHxTxS.astype(jnp.float32) / math.sqrt(cfg.head_dim)
        scores_BxHxTxS = jnp.where(visible_BxTxS[:, None], scores_BxHxTxS, jnp.finfo(jnp.float32).min)
        probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(cfg.dtype)
        probs_BxHxTxS = nn.Dropout(cfg.attn_pdrop)(probs_BxHxTxS, deterministic=deterministic)
        return jnp.einsum("bhqs,bshk->bqhk", probs_BxHxTxS, v_BxSxHxK)


class MLP(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool):
        cfg = self.cfg
        h_BxTxF = ACTIVATIONS[cfg.activation](_dense(cfg, cfg.d_ff, "c_fc")(x_BxTxD))
        out_BxTxD = _dense(cfg, cfg.d_model, "c_proj", cfg.residual_init_std)(h_BxTxF)
        return nn.Dropout(cfg.resid_pdrop)(out_BxTxD, deterministic=deterministic)


class Block(nn.Module):
    """One transformer block; `norm_position` selects GPT-1's or GPT-2's wiring.

    With a `cache` (see CausalSelfAttention) it returns (x, cache)."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool, cache=None, positions_BxT=None):
        cfg = self.cfg
        attn, mlp = CausalSelfAttention(cfg, name="attn"), MLP(cfg, name="mlp")
        ln_1, ln_2 = _layer_norm(cfg, "ln_1"), _layer_norm(cfg, "ln_2")
        if cfg.norm_position == "post":
            y_BxTxD, cache = attn(x_BxTxD, deterministic, cache, positions_BxT)
            x_BxTxD = ln_1(x_BxTxD + y_BxTxD)
            x_BxTxD = ln_2(x_BxTxD + mlp(x_BxTxD, deterministic))
        else:
            y_BxTxD, cache = attn(ln_1(x_BxTxD), deterministic, cache, positions_BxT)
            x_BxTxD = x_BxTxD + y_BxTxD
            x_BxTxD = x_BxTxD + mlp(ln_2(x_BxTxD), deterministic)
        return x_BxTxD if cache is None else (x_BxTxD, cache)


def init_cache(cfg: GPTConfig, batch_size: int, length: int):
    """An empty KV cache for `GPT.decode`: per layer (k, v), each B x L x H x K, where slot
    l holds the keys and values of the token at position l. L <= max_len."""
    shape = (batch_size, length, cfg.n_head, cfg.head_dim)
    if cfg.scan_layers:  # one (k, v) pair with a leading layer axis, scanned with the blocks
        return (jnp.zeros((cfg.n_layer, *shape), cfg.dtype),) * 2
    return tuple((jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
                 for _ in range(cfg.n_layer))


class _ScanStep(nn.Module):
    """One block as a step of nn.scan: the residual stream is the carry; a layer's slice of
    the stacked KV cache goes in and comes out."""

    cfg: GPTConfig
    block: Any  # Block, possibly wrapped in nn.remat

    @nn.compact
    def __call__(self, x_BxTxD, cache, positions_BxT, deterministic: bool):
        block = self.block(self.cfg, name="block")
        if cache is None:
            return block(x_BxTxD, deterministic), None
        return block(x_BxTxD, deterministic, cache, positions_BxT)


class GPT(nn.Module):
    """tokens_BxT -> logits_BxTxV (float32)."""

    cfg: GPTConfig

    def setup(self):
        cfg = self.cfg
        embed = lambda n, name: nn.Embed(  # noqa: E731
            n, cfg.d_model, embedding_init=nn.initializers.normal(cfg.init_std),
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
        self.wte = embed(cfg.vocab_size, "wte")
        self.wpe = embed(cfg.max_len, "wpe")
        self.drop = nn.Dropout(cfg.embd_pdrop)
        block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(2,)) \
            if cfg.remat != "none" else Block
        if cfg.scan_layers:  # parameters h/block/... with a leading layer axis
            self.blocks = nn.scan(
                _ScanStep, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.n_layer,
            )(cfg, block, name="h")
        else:
            self.blocks = [block(cfg, name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = _layer_norm(cfg, "ln_f") if cfg.final_norm else None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size, use_bias=False, kernel_init=nn.initializers.normal(cfg.init_std),
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, dot_general=matmul.dot_general,
                name="lm_head")

    @property
    def uses_dropout(self) -> bool:
        """Whether training needs a dropout key (no key, no RNG work when every rate is 0)."""
        c = self.cfg
        return max(c.embd_pdrop, c.resid_pdrop, c.attn_pdrop) > 0

    def example_inputs(self, seq_len: int) -> tuple:
        """Arguments of one __call__ with a batch of 1, for `init`."""
        return (jnp.zeros((1, seq_len), jnp.int32),)

    def hidden_states(self, tokens_BxT, deterministic: bool = True):
        """Final hidden states, before the head (what a fine-tuning classifier reads)."""
        positions_1xT = jnp.arange(tokens_BxT.shape[1])[None]
        return self._stack(tokens_BxT, positions_1xT, deterministic)[0]

    def decode(self, tokens_BxT, positions_BxT, cache):
        """Inference with a KV cache (`init_cache`): tokens at the given positions see the
        cached tokens at or before their own position. Returns (h_BxTxD, cache); the
        caller picks the rows of h it needs before `logits`.

        Each row has its own positions, so a batch of prompts of different lengths
        decodes at its true positions. Slots beyond a row's current position may hold
        anything (e.g. its right padding): they are masked until overwritten."""
        return self._stack(tokens_BxT, positions_BxT, True, cache)

    def _stack(self, tokens_BxT, positions_BxT, deterministic, cache=None):
        """Embeddings, blocks and ln_f -> (h_BxTxD, the updated cache or None)."""
        x_BxTxD = self.wte(tokens_BxT) + self.wpe(positions_BxT)
        x_BxTxD = self.drop(x_BxTxD, deterministic=deterministic)
        if self.cfg.scan_layers:
            x_BxTxD, cache = self.blocks(x_BxTxD, cache, positions_BxT, deterministic)
            return self._final(x_BxTxD), cache
        new_cache = []
        for i, block in enumerate(self.blocks):
            if cache is None:
                x_BxTxD = block(x_BxTxD, deterministic)
            else:
                x_BxTxD, layer_cache = block(x_BxTxD, deterministic, cache[i], positions_BxT)
                new_cache.append(layer_cache)
        return self._final(x_BxTxD), (None if cache is None else tuple(new_cache))

    def _final(self, x_BxTxD):
        return self.ln_f(x_BxTxD) if self.ln_f is not None else x_BxTxD

    def logits(self, h_BxTxD):
        """The tied head contracts the table's rows as stored, where Embed.attend's dot with
        embedding.T has batch-1 decoding read the table transposed: the same training step,
        and 5.6-6.1 instead of 10.7-10.8 ms per new token for the head at GPT-2 small
        (tools/op_profile.py --of=sample)."""
        if self.cfg.tie_embeddings:
            return tied_head_logits(*self._tied_head_operands(h_BxTxD)).astype(jnp.float32)
        return self.lm_head(h_BxTxD).astype(jnp.float32)

    def _tied_head_operands(self, h_BxTxD):
        return nn.dtypes.promote_dtype(h_BxTxD, self.wte.embedding, dtype=self.wte.dtype)

    def __call__(self, tokens_BxT, deterministic: bool = True):
        return self.logits(self.hidden_states(tokens_BxT, deterministic))

    def next_token_nll(self, tokens_BxT, targets_BxT, deterministic: bool = True):
        """-log p(target) at each position: the loss of `__call__`'s logits, with a tied head
        and the loss one op (on CPU, gpt.cross_entropy's fused kernel)."""
        h_BxTxD = self.hidden_states(tokens_BxT, deterministic)
        if self.cfg.tie_embeddings:
            return tied_head_cross_entropy(*self._tied_head_operands(h_BxTxD), targets_BxT)
        return softmax_cross_entropy(self.logits(h_BxTxD), targets_BxT)
