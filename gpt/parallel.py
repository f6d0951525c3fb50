"""The train and eval steps compiled for one layout: jit on one device, pmap over a host's
devices (data parallel), or jit over a (data, fsdp) mesh of all devices (sharded state)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from gpt.config import PARALLELISMS
from gpt.model import GPT
from gpt.train_step import Evaluate, Loss, TrainState, eval_step, lm_evaluate, lm_loss, train_step

AXIS = "batch"
MESH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 1024  # smaller leaves (biases, gains, the RNG key, counters) stay replicated


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
    """The train and eval steps for `parallelism`. jit and mesh compile them with XLA's
    `compiler_options` (pmap takes none). The model's ops must run on every device of a mesh
    without a custom call: XLA cannot partition one, so it would gather its operands whole."""
    options = compiler_options or {}
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
