"""AdamW with warmup + decay, a weight-decay mask and global-norm clipping (optax), applied on
CPU in one pass over each float32 parameter (adamw.cc).

XLA runs optax's update as several loops over each parameter, gradient and moment; the kernel
reads the four once and writes three. In a GPT-2 small step (tools/op_profile.py, README:
Performance) the update took 348 ms on XLA and 166 ms with the kernel. It takes optax's steps
in optax's order on the state optax keeps, so checkpoints do not depend on which ran. Used on
CPU in float32 with the kernels built, unless GPT_JAX_FUSED_ADAMW=0.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt import cpu_kernels


_VARIABLE = "GPT_JAX_FUSED_ADAMW"


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine or linear decay to `end_lr` at `total_steps`."""
    lr, end_lr, warmup = optim_cfg.lr, optim_cfg.end_lr, optim_cfg.warmup_steps
    decay_steps = max(total_steps - warmup, 1)
    decay = {
        "cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr / lr if lr else 0.0),
        "linear": lambda: optax.linear_schedule(lr, end_lr, decay_steps),
        "constant": lambda: optax.constant_schedule(lr),
    }[optim_cfg.schedule]()
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params):
    """Decay matrices (weights and embeddings), not biases or LayerNorm gains: GPT-1's
    'all non bias or gain weights', and nanoGPT's rule for GPT-2."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


class Optimizer(NamedTuple):
    """optax's (init, update), and `apply`: (grads, state, params) -> (params, state) updated,
    which TrainState.apply_gradients calls."""

    init: Callable
    update: Callable
    apply: Callable


def make_optimizer(optim_cfg, total_steps: int, fused: bool | None = None
                   ) -> tuple[Optimizer, optax.Schedule]:
    """fused=None: `apply` runs the kernel where it can (see above); True: also an error where
    the kernels cannot be built; False: optax's update."""
    schedule = lr_schedule(optim_cfg, total_steps)
    adamw = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                        weight_decay=optim_cfg.weight_decay, mask=decay_mask)
    tx = adamw
    if optim_cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw)

    def apply(grads, state, params):
        leaves = jax.tree_util.tree_leaves((grads, params))
        if (all(x.dtype == jnp.float32 for x in leaves)
                and cpu_kernels.use(fused, _VARIABLE, "AdamW")):
            return _fused_apply(optim_cfg, schedule, grads, state, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return Optimizer(tx.init, tx.update, apply), schedule


def _fused_apply(optim_cfg, schedule, grads, state, params):
    """optax's clip_by_global_norm, adamw and apply_updates, each number computed as optax
    computes it, the elementwise part in adamw.cc."""
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

    def update(p, g, mu, nu, weight_decay):
        return jax.ffi.ffi_call("gpt_adamw", (jax.ShapeDtypeStruct(p.shape, jnp.float32),) * 3,
                                input_output_aliases={0: 0, 2: 1, 3: 2})(
            p, g, mu, nu, hyper, weight_decay=np.float32(weight_decay))

    with jax.named_scope("adamw"):  # for profiles (tools/op_profile.py)
        out = jax.tree_util.tree_map(update, params, grads, adam.mu, adam.nu, decay)
    params, mu, nu = jax.tree.transpose(jax.tree.structure(params), jax.tree.structure((0, 0, 0)), out)
    return params, optax.tree.set(state, mu=mu, nu=nu, count=count)
