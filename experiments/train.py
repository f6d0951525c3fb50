"""Train a GPT from a config file; rerunning the same command resumes from the latest checkpoint.

python -m experiments.train --config=configs/gpt1.py:tiny --workdir=/tmp/run1 \
    [--config.model.norm_position=pre ...]
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags
from tqdm import tqdm

from experiments import common
from gpt import data, flops
from gpt.checkpoint import Checkpointer
from gpt.configuration import resume_changes, validate
from gpt.model import GPT, ConfigError
from gpt.optim import make_optimizer
from gpt.train_step import create_state, make_mesh, make_steps

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, logs and checkpoints.")


def _log(message: str) -> None:
    """Only process 0 speaks: a pod slice of hosts would otherwise print everything N times."""
    if jax.process_index() == 0:
        tqdm.write(message)


def _initialize_distributed(train_cfg) -> None:
    """Joins the processes of a multi-host run before any other JAX call. With no explicit
    values, JAX detects TPU pods, SLURM, Open MPI and similar from their environment; by hand:
    JAX_COORDINATOR_ADDRESS=host:port plus train.num_processes and train.process_id."""
    kwargs = {}
    if train_cfg.num_processes > 0:
        kwargs = {"num_processes": train_cfg.num_processes, "process_id": train_cfg.process_id}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; ignored elsewhere
    jax.distributed.initialize(**kwargs)


class Diverged(RuntimeError):
    """Training produced a non-finite loss or gradient norm; exit status 3."""


def _resolve_steps(config) -> None:
    """GPT-1 trained for a number of epochs: turn them into optimizer steps for this corpus."""
    if config.train.epochs > 0:
        tokens_per_step = config.data.batch_size * config.data.seq_len
        config.train.steps = max(1, math.ceil(
            config.train.epochs * data.count_tokens(config.data, "train") / tokens_per_step))


def evaluate(steps, device_state, eval_batches) -> float:
    losses = [steps.eval(device_state, steps.put_batch(b))["loss"] for b in eval_batches]
    return float(np.mean(jax.device_get(losses)))


class _Preemption:
    """SIGTERM (what a TPU VM or a scheduler sends before taking the machine) asks the loop
    to checkpoint at the current step and exit 0."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _resume(ckpt: Checkpointer, state, train_iter, config, workdir: str):
    """Restores the newest readable checkpoint after checking that the config still fits it;
    returns (state, step), step None when there was nothing to restore."""
    if not ckpt.all_steps():
        return state, None
    saved = None
    for step in reversed(ckpt.all_steps()):
        try:
            saved = ckpt.restore_config(step)
            break
        except Exception:  # noqa: BLE001 - unreadable; restore_latest_valid reports it below
            continue
    if saved is not None:
        unsafe, safe = resume_changes(saved, config.to_dict())
        if unsafe:
            key, (old, new) = next(iter(unsafe.items()))
            raise ConfigError(key, f"the checkpoints in {workdir} were made with {key}={old!r}; "
                                   f"resume with the same value or use a new --workdir", new)
        if safe:
            with open(os.path.join(workdir, "resumes.jsonl"), "a") as f:
                f.write(json.dumps({"changes": {k: list(v) for k, v in safe.items()}}) + "\n")
    restored, step, unreadable = ckpt.restore_latest_valid(state, train_iter)
    for bad_step, reason, moved_to in unreadable:
        _log(f"warning: checkpoint at step {bad_step} is unreadable ({reason}); "
                   f"moved to {moved_to}, trying the previous one")
    return (restored, step) if restored is not None else (state, None)


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    workdir = common.prepare_workdir(workdir)
    parallelism = config.train.parallelism
    mesh = make_mesh(config.train.mesh.data, config.train.mesh.fsdp) if parallelism == "mesh" else None
    num_devices = {"jit": 1, "pmap": jax.local_device_count() * jax.process_count()}.get(
        parallelism, jax.device_count())
    model_cfg = validate(config, num_devices)
    tokenizer = data.get_tokenizer(config.data)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError("model.vocab_size",
                          f"at least the tokenizer's vocabulary ({tokenizer.vocab_size})",
                          model_cfg.vocab_size)
    _resolve_steps(config)
    total_steps = config.train.steps

    model = GPT(model_cfg)
    tx, schedule = make_optimizer(config.optim, total_steps)
    steps = make_steps(model, schedule, parallelism, config.train.grad_accum_steps,
                       skip_nonfinite=config.train.skip_nonfinite, poison_step=config.train.poison_step,
                       mesh=mesh)
    state = create_state(model, tx, config.train.seed, config.data.seq_len, steps.shardings)
    train_iter = data.make_train_iterator(config.data, seed=config.train.seed,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
    eval_batches = data.make_eval_batches(config.data, num_batches=config.train.eval_steps,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_ckpts,
                        keep_best=config.train.keep_best)
    state, resumed_step = _resume(ckpt, state, train_iter, config, workdir)
    start_step = resumed_step or 0
    if jax.process_index() == 0:
        common.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())

    n_params = flops.count_params(state.params)
    flops_per_tok = flops.flops_per_token(model_cfg, n_params, config.data.seq_len)
    peak = (config.train.peak_flops or flops.measure_matmul_flops()) * num_devices
    tokens_per_step = config.data.batch_size * config.data.seq_len
    writer = common.MetricWriter(workdir, resume_step=start_step, enabled=jax.process_index() == 0)
    _log(f"{n_params:,} parameters | {flops_per_tok / 1e6:.1f} MFLOPs/token | "
               f"{total_steps:,} steps of {tokens_per_step:,} tokens | "
               f"{'from scratch' if resumed_step is None else f'resuming from step {resumed_step}'}")

    device_state = steps.put_state(state)
    last = {}
    preemption = _Preemption()
    bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    timer_step, timer = start_step, None
    try:
        for step in range(start_step + 1, total_steps + 1):
            device_state, metrics = steps.train(device_state, steps.put_batch(next(train_iter)))
            if timer is None:  # exclude compilation from the throughput
                jax.block_until_ready(metrics)
                timer_step, timer = step, time.perf_counter()
            bar.update(1)
            is_log = step % config.train.log_every == 0 or step == total_steps
            preempted = preemption.requested  # read once: a signal may land mid-iteration
            is_ckpt = step % config.train.ckpt_every == 0 or step == total_steps or preempted
            if (is_log or is_ckpt) and not config.train.skip_nonfinite:
                metrics = jax.device_get(metrics)  # a non-finite state is never logged as healthy nor saved
                if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
                    writer.write(step, {"train/loss": float(metrics["loss"]),
                                        "train/grad_norm": float(metrics["grad_norm"]), "diverged": True})
                    raise Diverged(f"non-finite loss or gradient at step {step}; last good checkpoint: "
                                   f"step {ckpt.latest_step() or 'none'} in {workdir}")

            if is_log:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - timer
                tokens_per_s = (step - timer_step) * tokens_per_step / elapsed if step > timer_step else 0.0
                last = {"train/loss": float(metrics["loss"]), "train/lr": float(metrics["lr"]),
                        "train/grad_norm": float(metrics["grad_norm"]),
                        "train/tokens_per_s": tokens_per_s,
                        "train/mfu": flops.mfu(tokens_per_s, flops_per_tok, peak)}
                if step % config.train.eval_every == 0 or step == total_steps:
                    last["eval/loss"] = evaluate(steps, device_state, eval_batches)
                writer.write(step, last)
                bar.set_postfix(loss=f"{last['train/loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                _log(f"step {step:>7} | " + " | ".join(f"{k} {v:.4g}" for k, v in last.items()))
                timer_step, timer = step, time.perf_counter()

            if is_ckpt:
                ckpt.save(step, steps.host_state(device_state), train_iter, config.to_dict(),
                          metrics=last if is_log else None)
            if preempted:
                _log(f"SIGTERM: saved a checkpoint at step {step}; rerun the command to resume")
                break
        else:
            if not last:  # nothing left to train: report where the run stands
                last = {"eval/loss": evaluate(steps, device_state, eval_batches)}
                _log(f"already trained to step {start_step}; eval/loss {last['eval/loss']:.4g}")
    finally:
        preemption.restore()
        bar.close()
        ckpt.close()
        writer.close()
    return last


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise ValueError("--config is required, e.g. --config=configs/gpt1.py:tiny")
    config = _CONFIG.value
    if config.train.distributed:
        _initialize_distributed(config.train)
    last = train_and_evaluate(config, _WORKDIR.value)
    if "eval/loss" in last:
        entropy = data.unigram_entropy(config.data)
        print(f"final eval loss {last['eval/loss']:.4f} nats/token "
              f"(unigram entropy of the corpus: {entropy:.4f}; lower means the model learned context)")


def main_or_diverged(argv):
    try:
        main(argv)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    common.run_program(main_or_diverged)
