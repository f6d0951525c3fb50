"""Shared by tests: the programs run as a user runs them, a tiny run config and
deterministic batches."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import gpt2
from gpt.config import model_config
from gpt.model import GPT
from gpt.ops import REFERENCE
from gpt.optim import make_optimizer
from gpt.train_step import create_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(module, *args, xla_flags: str = "", stderr=subprocess.PIPE) -> subprocess.Popen:
    """`python -m module args` from the repository root on the CPU; `xla_flags` go after
    the inherited XLA_FLAGS."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if xla_flags:
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def run(module, *args, timeout=600, **start_kwargs) -> subprocess.CompletedProcess:
    """`start`, then wait for it; its stdout and stderr come back whole."""
    with start(module, *args, **start_kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def tiny_config(**overrides):
    c = gpt2.get_config("tiny")
    c.model.n_layer, c.model.d_model, c.model.n_head, c.model.d_ff = 2, 32, 4, 64
    c.model.max_len, c.data.seq_len, c.data.batch_size = 16, 16, 16
    c.optim.warmup_steps = 2
    c.train.steps = 10
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def model_and_state(config, ops=REFERENCE):
    model = GPT(model_config(config), ops)
    tx, schedule = make_optimizer(config.optim, config.train.steps, ops)
    return model, schedule, create_state(model, tx, config.train.seed, config.data.seq_len)


def batches(config, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.data.batch_size, config.data.seq_len + 1)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, config.model.vocab_size, shape).astype(np.int32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    return out


def max_relative_error(a, b) -> float:
    """||a - b|| / ||b|| over the whole pytree. Per-element ratios would be dominated by
    parameters whose gradient is zero up to rounding (the key bias: softmax ignores it),
    which Adam turns into full-size steps of arbitrary sign."""
    diff = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    norm = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree_util.tree_leaves(b))
    return (diff / norm) ** 0.5


def compiled_memory(config):
    """(train, eval) memory_analysis() of a config's steps on one device, compiled from abstract
    shapes (nothing allocated), eval in its configured micro-batches."""
    from gpt.config import eval_micro_batch
    from gpt.parallel import make_steps
    model = GPT(model_config(config))
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    state = jax.eval_shape(lambda: create_state(model, tx, 0, config.data.seq_len))
    batch = {k: jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32)
             for k in ("inputs", "targets")}
    steps = make_steps(model, schedule, "jit", config.train.grad_accum_steps,
                       eval_micro_batches=config.data.batch_size // eval_micro_batch(config, 1))
    return tuple(step.lower(state, batch).compile().memory_analysis() for step in (steps.train, steps.eval))
