import os
import socket
import subprocess
import sys

import jax
import numpy as np

from gpt.parallel import make_steps
from tests.helpers import batches, max_relative_error, model_and_state, tiny_config


def _train(config, accum, n_steps=2, ops=None):
    model, schedule, state = model_and_state(config, *([ops] if ops else []))
    steps = make_steps(model, schedule, "jit", accum)
    metrics = None
    for batch in batches(config, n_steps):
        state, metrics = steps.train(state, batch)
    return state, metrics


def test_loss_decreases_and_metrics(ops):
    config = tiny_config(**{"optim.lr": 1e-2})
    model, schedule, state = model_and_state(config, ops)
    steps = make_steps(model, schedule, "jit")
    batch = batches(config, 1)[0]
    first = float(steps.eval(state, batch)["loss"])
    np.testing.assert_allclose(first, np.log(config.model.vocab_size), rtol=0.05)  # init ~ uniform
    for _ in range(10):
        state, metrics = steps.train(state, batch)
    assert float(steps.eval(state, batch)["loss"]) < first - 0.5
    assert int(state.step) == 10 and float(metrics["grad_norm"]) > 0
    np.testing.assert_allclose(float(metrics["lr"]), float(schedule(9)))


def test_gradient_accumulation_matches_one_large_batch(ops):
    config = tiny_config()
    one, m1 = _train(config, accum=1, ops=ops)
    four, m4 = _train(config, accum=4, ops=ops)
    assert max_relative_error(four.params, one.params) < 1e-5
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)


def test_dropout_masks_differ_between_steps_and_repeat_on_resume():
    """The same parameters and batch at steps 0, 1 and 2 draw three different masks (three
    training losses); a state rebuilt from host copies at step 1, as a resume restores it,
    draws step 1's mask again (the uninterrupted run's loss and update, bit for bit)."""
    config = tiny_config(**{"model.resid_pdrop": 0.1, "model.attn_pdrop": 0.1, "model.embd_pdrop": 0.1})
    model, schedule, state = model_and_state(config)
    steps = make_steps(model, schedule, "jit")
    batch = batches(config, 1)[0]
    host = jax.device_get(state)

    def from_host(host_state, step=None):  # fresh device buffers: the train step donates its input
        fresh = jax.tree_util.tree_map(jax.numpy.array, host_state)
        return fresh if step is None else fresh.replace(step=jax.numpy.array(step, fresh.step.dtype))

    same_params = [float(steps.train(from_host(host, k), batch)[1]["loss"]) for k in (0, 1, 2)]
    deterministic = float(steps.eval(from_host(host), batch)["loss"])
    assert len(set(same_params)) == 3 and deterministic not in same_params, (same_params, deterministic)

    after_one, _ = steps.train(from_host(host), batch)
    after_one = jax.device_get(after_one)
    run_on, run_metrics = steps.train(from_host(after_one), batch)
    resumed, resumed_metrics = steps.train(from_host(after_one), batch)
    assert float(resumed_metrics["loss"]) == float(run_metrics["loss"])
    assert max_relative_error(resumed.params, run_on.params) == 0.0


def test_pmap_and_mesh_match_jit_on_8_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = os.path.join(os.path.dirname(__file__), "multidevice_steps.py")
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("max relative parameter error") == 4, result.stdout
    assert "restored a data=2 x fsdp=4 checkpoint onto fsdp=8" in result.stdout


def test_two_processes_match_one_device():
    """jax.distributed on localhost: 2 processes x 4 CPU devices, each feeding its half of
    the batch, train the same 3 steps as one device."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = os.path.join(os.path.dirname(__file__), "multihost_steps.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, script, str(port), str(i), "2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    config = tiny_config()
    model, schedule, state = model_and_state(config)
    steps = make_steps(model, schedule, "jit")
    expected = []
    for batch in batches(config, 3):
        state, metrics = steps.train(state, batch)
        expected.append(float(metrics["loss"]))
    for out in outputs:
        losses = [float(x) for x in out.split("losses ")[1].split()]
        np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_bfloat16_compute_tracks_float32():
    """Parameters stay float32; matmuls run in bfloat16; LayerNorm, softmax and loss in float32."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(**{"model.dtype": dtype, "optim.lr": 1e-2})
        model, schedule, state = model_and_state(config)
        steps = make_steps(model, schedule, "jit")
        for batch in batches(config, 1) * 12:
            state, metrics = steps.train(state, batch)
        assert jax.tree_util.tree_leaves(state.params)[0].dtype == np.float32
        losses[dtype] = float(metrics["loss"])
    assert np.isfinite(losses["bfloat16"])
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.02)
    assert losses["float32"] < np.log(tiny_config().model.vocab_size) - 0.3  # it did learn
