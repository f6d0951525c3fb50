"""The GPT-1 / GPT-2 decoder stack as Flax linen modules.

Parameter names follow the released checkpoints (wte, wpe, h_i/attn/c_attn, ...)
so conversion to and from them is a rename plus transposes, not a re-design.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt.config import GPTConfig
from gpt.ops import REFERENCE, Ops

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


def _dense(cfg: GPTConfig, ops: Ops, features: int, name: str, std: float | None = None) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=nn.initializers.normal(std if std is not None else cfg.init_std),
        bias_init=nn.initializers.zeros,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        dot_general=ops.dot_general,
        name=name,
    )


def _layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
    # Flax computes LayerNorm statistics in at least float32 whatever the dtype.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, name=name)


class CausalSelfAttention(nn.Module):
    cfg: GPTConfig
    ops: Ops = REFERENCE

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool, cache=None, positions_BxT=None):
        """Returns (out, cache). Without a cache (None): causal attention over x. With one
        ((k, v), each B x L x H x K): this call's keys and values are written at
        `positions_BxT` first, and each query attends to the slots at or before its position."""
        cfg = self.cfg
        qkv_BxTx3D = _dense(cfg, self.ops, 3 * cfg.d_model, "c_attn")(x_BxTxD)
        if cache is not None:
            heads_BxTxD, cache = self.ops.cached_attention(qkv_BxTx3D, cache, positions_BxT,
                                                           n_head=cfg.n_head)
        else:
            attn_drop = nn.Dropout(cfg.attn_pdrop)
            dropout = None if deterministic or cfg.attn_pdrop == 0 else \
                lambda probs: attn_drop(probs, deterministic=False)
            heads_BxTxD = self.ops.causal_attention(
                qkv_BxTx3D, n_head=cfg.n_head, implementation=cfg.attention,
                block=cfg.attention_block, dropout=dropout)
        out_BxTxD = _dense(cfg, self.ops, cfg.d_model, "c_proj", cfg.residual_init_std)(heads_BxTxD)
        return nn.Dropout(cfg.resid_pdrop)(out_BxTxD, deterministic=deterministic), cache


class MLP(nn.Module):
    cfg: GPTConfig
    ops: Ops = REFERENCE

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool):
        cfg = self.cfg
        h_BxTxF = ACTIVATIONS[cfg.activation](_dense(cfg, self.ops, cfg.d_ff, "c_fc")(x_BxTxD))
        out_BxTxD = _dense(cfg, self.ops, cfg.d_model, "c_proj", cfg.residual_init_std)(h_BxTxF)
        return nn.Dropout(cfg.resid_pdrop)(out_BxTxD, deterministic=deterministic)


class Block(nn.Module):
    """One transformer block; `norm_position` selects GPT-1's or GPT-2's wiring.

    With a `cache` (see CausalSelfAttention) it returns (x, cache)."""

    cfg: GPTConfig
    ops: Ops = REFERENCE

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool, cache=None, positions_BxT=None):
        cfg = self.cfg
        attn, mlp = CausalSelfAttention(cfg, self.ops, name="attn"), MLP(cfg, self.ops, name="mlp")
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
    ops: Ops = REFERENCE

    @nn.compact
    def __call__(self, x_BxTxD, cache, positions_BxT, deterministic: bool):
        block = self.block(self.cfg, self.ops, name="block")
        if cache is None:
            return block(x_BxTxD, deterministic), None
        return block(x_BxTxD, deterministic, cache, positions_BxT)


class GPT(nn.Module):
    """tokens_BxT -> logits_BxTxV (float32). `ops` is the compute (gpt.ops): XLA's by default."""

    cfg: GPTConfig
    ops: Ops = REFERENCE

    def setup(self):
        cfg = self.cfg
        embed = lambda n, std, name: nn.Embed(  # noqa: E731
            n, cfg.d_model, embedding_init=nn.initializers.normal(std),
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
        self.wte = embed(cfg.vocab_size, cfg.init_std, "wte")
        self.wpe = embed(cfg.max_len, cfg.wpe_init_std, "wpe")
        self.drop = nn.Dropout(cfg.embd_pdrop)
        block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(2,)) \
            if cfg.remat != "none" else Block
        if cfg.scan_layers:  # parameters h/block/... with a leading layer axis
            self.blocks = nn.scan(
                _ScanStep, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.n_layer,
            )(cfg, block, self.ops, name="h")
        else:
            self.blocks = [block(cfg, self.ops, name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = _layer_norm(cfg, "ln_f") if cfg.final_norm else None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size, use_bias=False, kernel_init=nn.initializers.normal(cfg.init_std),
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, dot_general=self.ops.dot_general,
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
        """The output head: the token embedding's table (tied, as in both papers) or its own."""
        if self.cfg.tie_embeddings:
            return self.ops.tied_head_logits(*self._tied_head_operands(h_BxTxD)).astype(jnp.float32)
        return self.lm_head(h_BxTxD).astype(jnp.float32)

    def _tied_head_operands(self, h_BxTxD):
        return nn.dtypes.promote_dtype(h_BxTxD, self.wte.embedding, dtype=self.wte.dtype)

    def __call__(self, tokens_BxT, deterministic: bool = True):
        return self.logits(self.hidden_states(tokens_BxT, deterministic))

    def next_token_nll(self, tokens_BxT, targets_BxT, deterministic: bool = True):
        """-log p(target) at each position: the loss of `__call__`'s logits, with a tied head
        and its loss one op, which a platform's kernel may fuse."""
        h_BxTxD = self.hidden_states(tokens_BxT, deterministic)
        if self.cfg.tie_embeddings:
            return self.ops.tied_head_nll(*self._tied_head_operands(h_BxTxD), targets_BxT)
        return self.ops.nll(self.logits(h_BxTxD), targets_BxT)
