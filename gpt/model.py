"""The GPT-1 / GPT-2 decoder stack as Flax linen modules.

Parameter names follow the released checkpoints (wte, wpe, h_i/attn/c_attn, ...)
so conversion to and from them is a rename plus transposes, not a re-design.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # both papers' GELU
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value outside what is allowed; the message names the key."""

    def __init__(self, key: str, allowed: str, got: Any):
        super().__init__(f"{key}={got!r} is not allowed: {allowed}")
        self.key = key


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Architecture of one model; defaults are GPT-2 small."""

    vocab_size: int = 50257
    max_len: int = 1024
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    d_ff: int = 3072
    norm_position: str = "pre"  # "post": GPT-1's LN(x + f(x)); "pre": GPT-2's x + f(LN(x))
    final_norm: bool = True  # GPT-2's ln_f after the last block
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    tie_embeddings: bool = True
    init_std: float = 0.02
    scale_residual_init: bool = True  # GPT-2: residual projections get std / sqrt(2 * n_layer)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        for key in ("vocab_size", "max_len", "n_layer", "d_model", "n_head", "d_ff"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key}", "a positive integer", value)
        if self.norm_position not in NORM_POSITIONS:
            raise ConfigError("model.norm_position", "one of pre, post", self.norm_position)
        if self.d_model % self.n_head:
            raise ConfigError(
                "model.n_head", f"must divide model.d_model={self.d_model}", self.n_head)
        if self.activation not in ACTIVATIONS:
            raise ConfigError("model.activation", f"one of {', '.join(ACTIVATIONS)}", self.activation)
        for key in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}", "a probability in [0, 1)", getattr(self, key))
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"model.{key}", f"one of {', '.join(DTYPES)}", getattr(self, key))
        if not self.layer_norm_eps > 0:
            raise ConfigError("model.layer_norm_eps", "a positive number", self.layer_norm_eps)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def residual_init_std(self) -> float:
        if self.scale_residual_init:
            return self.init_std / math.sqrt(2 * self.n_layer)
        return self.init_std


def _dense(cfg: GPTConfig, features: int, name: str, std: float | None = None) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=nn.initializers.normal(std if std is not None else cfg.init_std),
        bias_init=nn.initializers.zeros,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name=name,
    )


def _layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
    # Flax computes LayerNorm statistics in at least float32 whatever the dtype.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, name=name)


class CausalSelfAttention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool):
        cfg = self.cfg
        B, T, _ = x_BxTxD.shape
        qkv = _dense(cfg, 3 * cfg.d_model, "c_attn")(x_BxTxD)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (
            a.reshape(B, T, cfg.n_head, cfg.head_dim) for a in jnp.split(qkv, 3, axis=-1))
        scores_BxHxTxT = jnp.einsum("bqhk,bshk->bhqs", q_BxTxHxK, k_BxTxHxK)
        scores_BxHxTxT = scores_BxHxTxT.astype(jnp.float32) / math.sqrt(cfg.head_dim)
        causal_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
        scores_BxHxTxT = jnp.where(causal_TxT, scores_BxHxTxT, jnp.finfo(jnp.float32).min)
        probs_BxHxTxT = jax.nn.softmax(scores_BxHxTxT, axis=-1).astype(cfg.dtype)
        probs_BxHxTxT = nn.Dropout(cfg.attn_pdrop)(probs_BxHxTxT, deterministic=deterministic)
        out_BxTxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxTxT, v_BxTxHxK)
        out_BxTxD = _dense(cfg, cfg.d_model, "c_proj", cfg.residual_init_std)(
            out_BxTxHxK.reshape(B, T, cfg.d_model))
        return nn.Dropout(cfg.resid_pdrop)(out_BxTxD, deterministic=deterministic)


class MLP(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool):
        cfg = self.cfg
        h_BxTxF = ACTIVATIONS[cfg.activation](_dense(cfg, cfg.d_ff, "c_fc")(x_BxTxD))
        out_BxTxD = _dense(cfg, cfg.d_model, "c_proj", cfg.residual_init_std)(h_BxTxF)
        return nn.Dropout(cfg.resid_pdrop)(out_BxTxD, deterministic=deterministic)


class Block(nn.Module):
    """One transformer block; `norm_position` selects GPT-1's or GPT-2's wiring."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool):
        cfg = self.cfg
        attn, mlp = CausalSelfAttention(cfg, name="attn"), MLP(cfg, name="mlp")
        ln_1, ln_2 = _layer_norm(cfg, "ln_1"), _layer_norm(cfg, "ln_2")
        if cfg.norm_position == "post":
            x_BxTxD = ln_1(x_BxTxD + attn(x_BxTxD, deterministic))
            return ln_2(x_BxTxD + mlp(x_BxTxD, deterministic))
        x_BxTxD = x_BxTxD + attn(ln_1(x_BxTxD), deterministic)
        return x_BxTxD + mlp(ln_2(x_BxTxD), deterministic)


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
        self.blocks = [Block(cfg, name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = _layer_norm(cfg, "ln_f") if cfg.final_norm else None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size, use_bias=False, kernel_init=nn.initializers.normal(cfg.init_std),
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="lm_head")

    def hidden_states(self, tokens_BxT, deterministic: bool = True):
        """Final hidden states, before the head (what a fine-tuning classifier reads)."""
        T = tokens_BxT.shape[1]
        x_BxTxD = self.wte(tokens_BxT) + self.wpe(jnp.arange(T))[None]
        x_BxTxD = self.drop(x_BxTxD, deterministic=deterministic)
        for block in self.blocks:
            x_BxTxD = block(x_BxTxD, deterministic)
        return self.ln_f(x_BxTxD) if self.ln_f is not None else x_BxTxD

    def logits(self, h_BxTxD):
        if self.cfg.tie_embeddings:
            return self.wte.attend(h_BxTxD).astype(jnp.float32)
        return self.lm_head(h_BxTxD).astype(jnp.float32)

    def __call__(self, tokens_BxT, deterministic: bool = True):
        return self.logits(self.hidden_states(tokens_BxT, deterministic))
