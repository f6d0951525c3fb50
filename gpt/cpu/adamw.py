"""optax's clip + AdamW update in one C++ pass per float32 parameter (adamw.cc).

XLA runs optax's update as several loops over each parameter, gradient and moment; the kernel
reads the four once and writes the update and both moments. It takes optax's steps in optax's
order on the state optax keeps, so checkpoints do not depend on which ran, and it returns
updates as any optax transformation does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt.optim import decay_mask


def adamw(reference: optax.GradientTransformation, optim_cfg, schedule) -> optax.GradientTransformation:
    """`reference` (gpt.optim's chain of clip_by_global_norm and adamw for `optim_cfg`) with its
    update in the kernel where a step is lowered for CPU with float32 parameters."""

    def update(grads, state, params):
        if not all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves((grads, params))):
            return reference.update(grads, state, params)
        return jax.lax.platform_dependent(
            grads, state, params, default=reference.update,
            cpu=lambda g, s, p: _fused_update(optim_cfg, schedule, g, s, p))

    return optax.GradientTransformation(reference.init, update)


def _fused_update(optim_cfg, schedule, grads, state, params):
    """optax's clip_by_global_norm and adamw, each number computed as optax computes it, the
    elementwise part in adamw.cc."""
    b1, b2, clip = optim_cfg.b1, optim_cfg.b2, optim_cfg.grad_clip
    adam = optax.tree.get(state, "ScaleByAdamState")
    count = optax.safe_increment(adam.count)
    divisor = factor = jnp.float32(1.0)
    if clip > 0:
        norm = optax.tree.norm(grads)
        divisor, factor = jnp.where(norm < clip, 1.0, norm), jnp.where(norm < clip, 1.0, clip)
    hyper = jnp.stack([jnp.asarray(x, jnp.float32) for x in (
        schedule(adam.count), 1 - b1 ** count, 1 - b2 ** count, divisor, factor,
        b1, 1 - b1, b2, 1 - b2, optim_cfg.eps)])
    decay = jax.tree_util.tree_map(lambda m: optim_cfg.weight_decay if m else 0.0, decay_mask(params))

    def one(p, g, mu, nu, weight_decay):
        return jax.ffi.ffi_call("gpt_adamw", (jax.ShapeDtypeStruct(p.shape, jnp.float32),) * 3,
                                input_output_aliases={1: 0, 2: 1, 3: 2})(
            p, g, mu, nu, hyper, weight_decay=np.float32(weight_decay))

    with jax.named_scope("adamw"):  # for profiles (tools/op_profile.py)
        out = jax.tree_util.tree_map(one, params, grads, adam.mu, adam.nu, decay)
    updates, mu, nu = jax.tree.transpose(jax.tree.structure(params), jax.tree.structure((0, 0, 0)), out)
    return updates, optax.tree.set(state, mu=mu, nu=nu, count=count)
