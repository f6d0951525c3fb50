"""Parameter counts, FLOPs per token and model FLOPs utilisation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gpt.model import GPT, GPTConfig


def param_shapes(cfg: GPTConfig):
    """The parameter pytree as ShapeDtypeStructs: nothing is allocated."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda: GPT(cfg).init(jax.random.PRNGKey(0), jnp.ones(tokens.shape, tokens.dtype)))["params"]


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def matmul_params(cfg: GPTConfig, n_params: int) -> int:
    """Parameters that take part in a matmul per token: all but the position table
    (a lookup); the tied token table counts once, as the output head (nanoGPT's N)."""
    return n_params - cfg.max_len * cfg.d_model


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token, forward and backward: 6N + 12*L*T*d (PaLM, appendix B)."""
    return 6 * matmul_params(cfg, n_params) + 12 * cfg.n_layer * seq_len * cfg.d_model


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops: float) -> float:
    return tokens_per_s * flops_per_tok / peak_flops
