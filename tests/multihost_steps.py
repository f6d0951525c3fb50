"""Run by test_train_step.py: PROCESS_ID of NUM_PROCESSES processes, each with 4 CPU devices,
joined by jax.distributed on localhost, train 3 mesh steps; prints the losses."""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from gpt.parallel import make_mesh, make_steps
from gpt.train_step import create_state  # noqa: E402
from tests.helpers import batches, model_and_state, tiny_config  # noqa: E402


def main(port: int, process_id: int, num_processes: int):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes, process_id=process_id)
    assert jax.device_count() == 4 * num_processes
    config = tiny_config()
    model, schedule, state = model_and_state(config)
    steps = make_steps(model, schedule, "mesh", mesh=make_mesh(1, -1))
    state = create_state(model, state.tx, config.train.seed, config.data.seq_len, steps.shardings)
    rows = config.data.batch_size // num_processes
    losses = []
    for batch in batches(config, 3):
        local = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in batch.items()}
        state, metrics = steps.train(state, steps.put_batch(local))
        losses.append(float(metrics["loss"]))
    print("losses", " ".join(f"{x:.7f}" for x in losses), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
