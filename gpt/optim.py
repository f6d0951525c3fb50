"""AdamW with warmup + decay, a weight-decay mask and global-norm clipping (optax)."""
from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


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


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(optim_cfg, total_steps)
    adamw = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                        weight_decay=optim_cfg.weight_decay, mask=decay_mask)
    if optim_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw), schedule
    return adamw, schedule
