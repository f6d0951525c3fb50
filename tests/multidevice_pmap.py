"""Run by test_train_step.py in a subprocess with 8 host devices: pmap must equal jit."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gpt.train_step import make_steps  # noqa: E402
from tests.helpers import batches, max_relative_error, model_and_state, tiny_config  # noqa: E402


def run(parallelism, accum):
    config = tiny_config()
    model, schedule, state = model_and_state(config)
    steps = make_steps(model, schedule, parallelism, accum)
    device_state = steps.put_state(state)
    losses = []
    for batch in batches(config, 3):
        device_state, metrics = steps.train(device_state, steps.put_batch(batch))
        losses.append(float(metrics["loss"]))
    return steps.host_state(device_state).params, losses, steps.num_devices


def main():
    assert jax.local_device_count() == 8, jax.devices()
    ref_params, ref_losses, _ = run("jit", 1)
    for parallelism, accum in (("pmap", 1), ("pmap", 2)):
        params, losses, n = run(parallelism, accum)
        assert n == 8
        err = max_relative_error(params, ref_params)
        print(f"{parallelism} accum={accum}: max relative parameter error after 3 steps {err:.2e}")
        assert err < 1e-5, err
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


if __name__ == "__main__":
    main()
