"""Run by test_train_step.py in a subprocess with 8 host devices: pmap and the sharded
mesh steps must equal the single-device jit step."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gpt.config import model_config  # noqa: E402
from gpt.parallel import make_mesh, make_steps
from gpt.train_step import create_state  # noqa: E402
from tests.helpers import batches, max_relative_error, model_and_state, tiny_config  # noqa: E402


def run(parallelism, accum, mesh=None):
    config = tiny_config()
    model, schedule, state = model_and_state(config)
    steps = make_steps(model, schedule, parallelism, accum, mesh=mesh)
    if steps.shardings:  # initialised in place, each device holding its shard
        state = create_state(model, state.tx, config.train.seed, config.data.seq_len, steps.shardings)
        sharded = [x for x in jax.tree_util.tree_leaves(state.params) if not x.sharding.is_fully_replicated]
        assert sharded, "fsdp sharded no parameter"
    device_state = steps.put_state(state)
    losses = []
    for batch in batches(config, 3):
        device_state, metrics = steps.train(device_state, steps.put_batch(batch))
        losses.append(float(metrics["loss"]))
    return steps.host_state(device_state), losses, steps.num_devices


def main():
    assert jax.local_device_count() == 8, jax.devices()
    ref_state, ref_losses, _ = run("jit", 1)
    ref_params = ref_state.params
    for parallelism, accum, mesh in (("pmap", 1, None), ("pmap", 2, None), ("mesh", 1, make_mesh(1, 8)),
                                     ("mesh", 2, make_mesh(2, 4))):
        state, losses, n = run(parallelism, accum, mesh)
        params = state.params
        assert n == 8
        err = max_relative_error(jax.device_get(params), ref_params)
        name = f"{parallelism}{dict(mesh.shape) if mesh else ''} accum={accum}"
        print(f"{name}: max relative parameter error after 3 steps {err:.2e}")
        assert err < 1e-5, err
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    restore_onto_another_mesh(state)
    per_example_eval_outputs()


def per_example_eval_outputs():
    """Fine-tuning's eval returns one score per example: every layout returns all of them,
    in order, and the same averaged scalars."""
    from gpt.finetune.model import GPTClassifier, make_evaluate
    from gpt.optim import make_optimizer

    config = tiny_config()
    model = GPTClassifier(model_config(config), num_outputs=3)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    state = create_state(model, tx, 0, 8)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 50, (16, 1, 8)).astype(np.int32),
             "extract": rng.integers(0, 8, (16, 1)).astype(np.int32),
             "label": rng.integers(0, 3, 16).astype(np.float32), "weight": np.ones(16, np.float32)}
    outputs = {}
    for parallelism, mesh in (("jit", None), ("pmap", None), ("mesh", make_mesh(2, 4))):
        steps = make_steps(model, schedule, parallelism, evaluate=make_evaluate(False), mesh=mesh)
        outputs[parallelism] = jax.device_get(steps.eval(steps.put_state(state), steps.put_batch(batch)))
    for parallelism in ("pmap", "mesh"):
        np.testing.assert_allclose(outputs[parallelism]["scores"], outputs["jit"]["scores"], rtol=1e-5, atol=1e-6)
        ratio = lambda o: o["loss_sum"] / o["count"]  # noqa: E731 - pmap averages both over devices
        np.testing.assert_allclose(ratio(outputs[parallelism]), ratio(outputs["jit"]), rtol=1e-5)
    print("fine-tuning eval: pmap and mesh return jit's per-example scores")


def restore_onto_another_mesh(state):
    """A checkpoint saved sharded over data=2 x fsdp=4 restores onto fsdp=8 unchanged."""
    import tempfile

    from gpt.checkpoint import Checkpointer
    from gpt.parallel import fsdp_shardings

    with tempfile.TemporaryDirectory() as directory:
        ckpt = Checkpointer(directory)
        ckpt.save(3, state, None, {})
        ckpt.close()
        mesh = make_mesh(1, 8)
        target = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, fsdp_shardings(mesh, state))
        restored = Checkpointer(directory).restore(3, target)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.mesh.shape == mesh.shape
    print("restored a data=2 x fsdp=4 checkpoint onto fsdp=8")


if __name__ == "__main__":
    main()
