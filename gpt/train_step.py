"""Train state, loss, and the train/eval steps with their jit, pmap and mesh wrappers.

One pure `train_step` serves every layout: under pmap it is given the axis name and
averages gradients and metrics across devices; under jit it runs as is. It also serves
every objective: language modelling here, GPT-1's fine-tuning in gpt.finetune, each a
`Loss` and an `Evaluate` function.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from gpt import cpu_kernels
from gpt.compiler import default_compiler_options
from gpt.config import PARALLELISMS
from gpt.model import GPT
from gpt.optim import Optimizer


AXIS = "batch"
MESH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 1024  # smaller leaves (biases, gains, the RNG key, counters) stay replicated


class TrainState(train_state.TrainState):
    rng: jax.Array  # base dropout key; per step, device and micro-batch keys are folded in

    def apply_gradients(self, *, grads, **kwargs):
        """The update by gpt.optim's `apply` (one fused pass per parameter on CPU) where tx
        has one; flax's, through optax, otherwise."""
        if not hasattr(self.tx, "apply"):
            return super().apply_gradients(grads=grads, **kwargs)
        params, opt_state = self.tx.apply(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)


def create_state(model: GPT, tx: optax.GradientTransformation | Optimizer, seed: int, seq_len: int,
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


@dataclasses.dataclass(frozen=True)
class Steps:
    """Compiled steps for one parallelism, plus how to move state and batches into its layout."""

    train: Callable[[Any, Any], tuple[Any, dict]]  # (device state, device batch) -> (state, metrics)
    eval: Callable[[Any, Any], dict]
    put_state: Callable[[TrainState], Any]
    put_batch: Callable[[Any], Any]
    host_state: Callable[[Any], TrainState]  # one copy, for checkpoints and inspection
    num_devices: int
    shardings: Callable | None = None  # abstract state -> shardings, for create_state


def make_mesh(data: int = 1, fsdp: int = -1) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over all devices of all processes; -1 takes what is left."""
    n = jax.device_count()
    sizes = [data, fsdp]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"train.mesh=(data={data}, fsdp={fsdp}) is not allowed: positive sizes, at most one -1")
    if -1 in sizes:
        known = abs(np.prod(sizes))
        sizes[sizes.index(-1)] = n // known if n % known == 0 else 0
    if np.prod(sizes) != n:
        raise ValueError(f"train.mesh=(data={data}, fsdp={fsdp}) is not allowed: "
                         f"data x fsdp must equal the {n} devices")
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=jax.devices(),
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def fsdp_shardings(mesh: jax.sharding.Mesh, tree):
    """Shards each large leaf along its largest dimension divisible by the fsdp size (so
    parameters and Adam's moments are split the same way); replicates the rest."""
    fsdp = mesh.shape["fsdp"]

    def sharding(leaf):
        spec = [None] * len(leaf.shape)
        if fsdp > 1 and np.prod(leaf.shape) >= MIN_SHARDED_SIZE:
            for axis in sorted(range(len(leaf.shape)), key=lambda a: -leaf.shape[a]):
                if leaf.shape[axis] % fsdp == 0:
                    spec[axis] = "fsdp"
                    break
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    return jax.tree_util.tree_map(sharding, tree)


def _mesh_steps(step, evaluate, mesh: jax.sharding.Mesh, options: dict) -> Steps:
    """jit over a (data, fsdp) mesh: the batch is split over both axes, the state along fsdp;
    XLA inserts the all-gathers and reduce-scatters."""
    P = jax.sharding.PartitionSpec
    batch_sharding = jax.sharding.NamedSharding(mesh, P(MESH_AXES))
    replicated = jax.sharding.NamedSharding(mesh, P())
    state_shardings = functools.partial(fsdp_shardings, mesh)
    if mesh.size > 1:
        step, evaluate = cpu_kernels.traced_without(step), cpu_kernels.traced_without(evaluate)
    compiled = {}

    def train(state, batch):
        if "train" not in compiled:  # the state's shardings are known once it exists
            out = (jax.tree_util.tree_map(lambda x: x.sharding, state), replicated)
            compiled["train"] = jax.jit(step, out_shardings=out, donate_argnums=0,
                                        compiler_options=options)
        return compiled["train"](state, batch)

    def put_batch(batch):  # each process contributes its own rows of the global batch
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch)

    return Steps(train=train,
                 eval=jax.jit(evaluate, out_shardings=replicated, compiler_options=options),
                 put_state=lambda s: jax.device_put(s, state_shardings(s)), put_batch=put_batch,
                 host_state=lambda s: s, num_devices=jax.device_count(), shardings=state_shardings)


def make_steps(model: GPT, schedule, parallelism: str = "jit", accum_steps: int = 1, *,
               loss: Loss = lm_loss, evaluate: Evaluate = lm_evaluate,
               skip_nonfinite: bool = False, poison_step: int = 0,
               mesh: jax.sharding.Mesh | None = None, compiler_options: dict | None = None) -> Steps:
    """The train and eval steps for `parallelism`. jit and mesh compile them with
    `compiler_options` (None: default_compiler_options(); pmap takes none)."""
    options = default_compiler_options() if compiler_options is None else compiler_options
    step = functools.partial(train_step, schedule=schedule, loss=loss, accum_steps=accum_steps,
                             dropout=model.uses_dropout, skip_nonfinite=skip_nonfinite,
                             poison_step=poison_step)
    evaluate_step = functools.partial(eval_step, evaluate=evaluate)
    if parallelism == "jit":
        return Steps(train=jax.jit(step, donate_argnums=0, compiler_options=options),
                     eval=jax.jit(evaluate_step, compiler_options=options),
                     put_state=lambda s: s, put_batch=lambda b: b, host_state=lambda s: s,
                     num_devices=1)
    if parallelism == "mesh":
        return _mesh_steps(step, evaluate_step, mesh if mesh is not None else make_mesh(), options)
    if parallelism != "pmap":
        raise ValueError(f"train.parallelism={parallelism!r} is not allowed: one of {', '.join(PARALLELISMS)}")

    n = jax.local_device_count()
    # pmap's outputs live on a mesh named after its axis; inputs placed on the same mesh
    # keep the second call from recompiling.
    stacked = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,)), jax.sharding.PartitionSpec(AXIS))
    first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)  # noqa: E731
    p_train = jax.pmap(functools.partial(step, axis_name=AXIS), axis_name=AXIS, donate_argnums=0)
    p_eval = jax.pmap(functools.partial(evaluate_step, axis_name=AXIS), axis_name=AXIS)

    def eval_(state, batch):  # pmean'd scalars: the first copy; per-example rows: all devices'
        return {k: v[0] if v.ndim == 1 else v.reshape(-1, *v.shape[2:])
                for k, v in p_eval(state, batch).items()}

    def train(state, batch):
        state, metrics = p_train(state, batch)
        return state, first(metrics)  # pmean'd: every copy holds the same value

    def put_state(state):
        copies = jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (n, *x.shape)), state)
        return jax.device_put(copies, stacked)

    def put_batch(batch):
        return jax.device_put(jax.tree_util.tree_map(
            lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch), stacked)

    return Steps(train=train, eval=eval_, put_state=put_state,
                 put_batch=put_batch, host_state=first, num_devices=n)
