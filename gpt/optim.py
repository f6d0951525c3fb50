"""AdamW with linear warmup and cosine or linear decay, weight decay on weights and embeddings
only, and global-norm clipping: one optax transformation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gpt.ops import REFERENCE, Ops

DECAYED = ("kernel", "embedding")  # nn.Dense's and nn.Embed's matrices


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine or linear decay to `end_lr` at `total_steps`;
    or "warmup_linear", GPT-1's fine-tuning schedule as released, update for update
    (finetune-transformer-lm opt.py): the n-th update (from 1) uses lr * f(n / total_steps),
    f(x) = x / w up to w = warmup_steps / total_steps, then 1 - x; end_lr is not used."""
    lr, end_lr, warmup = optim_cfg.lr, optim_cfg.end_lr, optim_cfg.warmup_steps
    if optim_cfg.schedule == "warmup_linear":
        w = warmup / total_steps

        def warmup_linear(count):
            x = (count + 1) / total_steps
            return lr * jnp.where(x <= w, x / max(w, 1e-12), 1 - x)

        return warmup_linear
    decay_steps = max(total_steps - warmup, 1)
    decay = {
        "cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr / lr if lr else 0.0),
        "linear": lambda: optax.linear_schedule(lr, end_lr, decay_steps),
        "constant": lambda: optax.constant_schedule(lr),
    }[optim_cfg.schedule]()
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params):
    """Decay weights and embeddings, not biases or LayerNorm gains and biases: GPT-1's 'all non
    bias or gain weights', and nanoGPT's rule for GPT-2. Decided by what a parameter is (its
    name), so that layers stacked by scan_layers, whose biases are matrices, are treated alike."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED, params)


def make_optimizer(optim_cfg, total_steps: int, ops: Ops = REFERENCE
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax's clip_by_global_norm and adamw; `ops.adamw`, where set, computes the same update
    in one pass per parameter."""
    schedule = lr_schedule(optim_cfg, total_steps)
    tx = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                     weight_decay=optim_cfg.weight_decay, mask=decay_mask)
    if optim_cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), tx)
    if ops.adamw is not None:
        tx = ops.adamw(tx, optim_cfg, schedule)
    return tx, schedule
