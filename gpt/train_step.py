"""Train state, loss, and the pure train and eval steps (gpt.parallel compiles them).

One pure `train_step` serves every layout: under pmap it is given the axis name and
averages gradients and metrics across devices; under jit it runs as is. It also serves
every objective: language modelling here, GPT-1's fine-tuning in gpt.finetune, each a
`Loss` and an `Evaluate` function.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from gpt.model import GPT


class TrainState(train_state.TrainState):
    rng: jax.Array  # base dropout key; per step, device and micro-batch keys are folded in


def create_state(model: GPT, tx: optax.GradientTransformation, seed: int, seq_len: int,
                 shardings: Callable | None = None) -> TrainState:
    """With `shardings` (abstract state -> shardings) every device initialises only its own
    shard: no host ever holds the whole model."""
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))

    def init():
        params = model.init(init_rng, *model.example_inputs(seq_len))["params"]
        state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=dropout_rng)
        return state.replace(step=jnp.zeros((), jnp.int32))  # not weak-typed: no recompiles

    out_shardings = shardings(jax.eval_shape(init)) if shardings else None
    return jax.jit(init, out_shardings=out_shardings)()


# (params, apply_fn, batch, dropout rng, train) -> (loss, {name: scalar metric})
Loss = Callable[..., tuple[jax.Array, dict]]
# (params, apply_fn, batch) -> {name: scalar averaged over the batch, or per-example array}
Evaluate = Callable[..., dict]


def lm_loss(params, apply_fn, batch, rng, train: bool):
    """Next-token cross-entropy of batch["inputs"] against batch["targets"]."""
    nll_BxT = apply_fn({"params": params}, batch["inputs"], batch["targets"], deterministic=not train,
                       rngs={"dropout": rng} if train else None, method="next_token_nll")
    return nll_BxT.mean(), {}


def lm_evaluate(params, apply_fn, batch):
    return {"loss": lm_loss(params, apply_fn, batch, None, False)[0]}


def train_step(state: TrainState, batch, *, schedule, loss: Loss = lm_loss, accum_steps: int = 1,
               dropout: bool = True, axis_name: str | None = None, skip_nonfinite: bool = False,
               poison_step: int = 0):
    """One optimizer update. With `accum_steps` > 1 the batch is cut into that many
    micro-batches whose gradients are averaged: the same update as one large batch.
    With `skip_nonfinite` an update whose loss or gradient is not finite leaves the state as
    it was (only the step advances); `poison_step` makes that step's loss and gradient NaN."""
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    grad_fn = jax.value_and_grad(loss, has_aux=True)

    if accum_steps == 1:
        (value, aux), grads = grad_fn(state.params, state.apply_fn, batch, rng, dropout)
    else:
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

        def accumulate(carry, i_and_mb):
            i, mb = i_and_mb
            out = grad_fn(state.params, state.apply_fn, mb, jax.random.fold_in(rng, i), dropout)
            return jax.tree_util.tree_map(jnp.add, carry, out), None

        first_mb = jax.tree_util.tree_map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda p, b: grad_fn(p, state.apply_fn, b, rng, dropout),
                                state.params, first_mb)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        ((value, aux), grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro))
        value, aux, grads = jax.tree_util.tree_map(lambda x: x / accum_steps, (value, aux, grads))

    if axis_name is not None:
        value, aux, grads = jax.lax.pmean((value, aux, grads), axis_name)
    if poison_step:
        poison = jnp.where(state.step + 1 == poison_step, jnp.nan, 0.0)
        value, grads = jax.tree_util.tree_map(lambda x: x + poison, (value, grads))
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step), **aux}
    new_state = state.apply_gradients(grads=grads)
    if skip_nonfinite:
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        kept = jax.tree_util.tree_map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        new_state, metrics["skipped"] = kept.replace(step=new_state.step), ~ok
    return new_state, metrics


def eval_step(state: TrainState, batch, *, evaluate: Evaluate = lm_evaluate,
              axis_name: str | None = None):
    """Scalars are averaged across devices; per-example arrays stay per device (the pmap
    wrapper puts the devices' rows back together)."""
    out = evaluate(state.params, state.apply_fn, batch)
    if axis_name is not None:
        out = {k: jax.lax.pmean(v, axis_name) if v.ndim == 0 else v for k, v in out.items()}
    return out
