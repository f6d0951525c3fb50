"""Compile time of a config's train step, scanned layers beside unrolled ones, without
allocating the model (abstract shapes only): issue 6's check that scan_layers keeps compile
time flat in depth.

python tools/compile_time.py --config=configs/gpt2.py:xl [--config.data.batch_size=1 ...]
"""
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gpt.config import validate  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.optim import make_optimizer  # noqa: E402
from gpt.parallel import make_steps
from gpt.train_step import create_state  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")


def main(_):
    config = _CONFIG.value
    cfg = validate(config)
    batch = {k: jax.ShapeDtypeStruct((config.data.batch_size // config.train.grad_accum_steps,
                                      config.data.seq_len), jnp.int32) for k in ("inputs", "targets")}
    for scan in (True, False):
        model = GPT(dataclasses.replace(cfg, scan_layers=scan))
        tx, schedule = make_optimizer(config.optim, config.train.steps)
        state = jax.eval_shape(lambda: create_state(model, tx, 0, config.data.seq_len))
        step = make_steps(model, schedule, "jit").train
        start = time.perf_counter()
        lowered = step.lower(state, batch)
        lower_s = time.perf_counter() - start
        lowered.compile()
        print(f"scan_layers={scan}: lower {lower_s:.1f} s, compile {time.perf_counter() - start - lower_s:.1f} s",
              flush=True)


if __name__ == "__main__":
    app.run(main)
