"""The training loop that pre-training and fine-tuning share: resume, train, log,
evaluate, checkpoint, stop cleanly on SIGTERM or a non-finite loss.

A `Job` says what is trained (model, objective, data, how to summarise evaluation);
`run` does the rest the same way for every job.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from experiments import common
from gpt import flops
from gpt.checkpoint import Checkpointer
from gpt.config import ConfigError, eval_micro_batch, resume_changes
from gpt.optim import make_optimizer
from gpt.parallel import make_mesh, make_steps
from gpt.train_step import Evaluate, Loss, create_state, lm_evaluate, lm_loss


def _log(message: str) -> None:
    """Only process 0 speaks: a pod slice of hosts would otherwise print everything N times."""
    if jax.process_index() == 0:
        tqdm.write(message)


def initialize_distributed(train_cfg) -> None:
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


def evaluate(steps, device_state, eval_batches, summarize) -> dict:
    outputs = [steps.eval(device_state, steps.put_batch(b)) for b in eval_batches]
    return summarize(jax.device_get(outputs))


def _mean_loss(outputs: list[dict]) -> dict:
    return {"eval/loss": float(np.mean([o["loss"] for o in outputs]))}


@dataclasses.dataclass
class Job:
    """What the loop trains: everything that differs between pre-training and fine-tuning."""

    model: nn.Module
    seq_len: int  # of the training sequences: initialisation and FLOPs per token
    tokens_per_step: int
    train_iter: Any  # a grain iterator, checkpointed with the state
    eval_batches: list
    loss: Loss = lm_loss
    evaluate: Evaluate = lm_evaluate
    summarize: Callable[[list[dict]], dict] = _mean_loss  # eval outputs -> {"eval/...": float}
    initial_params: Callable[[Any], Any] | None = None  # fresh params -> starting params
    origin: str = "from scratch"  # where a run that is not resumed starts, for its header
    corpus: str = ""  # the version of the text trained on (corpus.corpus_id): a resume must read it


class _Preemption:
    """SIGTERM (what a TPU VM or a scheduler sends before taking the machine) or SIGINT
    (Ctrl-C) asks the loop to checkpoint at the current step and exit 0. The handler only
    sets a flag, so the signal never interrupts a JAX callback or an orbax commit midway (a
    KeyboardInterrupt raised there can be swallowed), and it stays installed until the last
    save has committed: a second signal cannot kill the process mid-commit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None  # the name of the first signal received
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _resume(ckpt: Checkpointer, state, train_iter, recorded: dict, workdir: str):
    """Restores the newest readable checkpoint after checking that the config and the corpus
    (`recorded`, as each checkpoint records them) still fit it; returns (state, step), step
    None when there was nothing to restore."""
    saved = None
    for step in reversed(ckpt.all_steps()):
        try:
            saved = ckpt.restore_config(step)
            break
        except Exception:  # noqa: BLE001 - unreadable; restore_latest_valid reports it below
            continue
    safe = {}
    if saved is not None:
        unsafe, safe = resume_changes(saved, recorded)
        if "corpus" in unsafe:
            raise ValueError(f"data.name={recorded['data']['name']!r}: its text has changed since the "
                             f"checkpoints in {workdir} were made (corpus {unsafe['corpus'][0]}, now "
                             f"{unsafe['corpus'][1]}); restore it or use a new --workdir")
        if unsafe:
            key, (old, new) = next(iter(unsafe.items()))
            raise ConfigError(key, f"the checkpoints in {workdir} were made with {key}={old!r}; "
                                   f"resume with the same value or use a new --workdir", new)
        if "train.steps" in safe:
            old, new = safe["train.steps"]
            _log(f"train.steps {old} -> {new}: the learning-rate schedule is stretched over "
                 f"{new} steps, so from here on it differs from the saved run's")
    # When none is readable this raises and changes nothing: starting afresh would replace
    # the run's history with another data stream's.
    restored, step, unreadable = ckpt.restore_latest_valid(state, train_iter)
    if restored is None:  # no checkpoint yet
        return state, None
    for bad_step, reason, moved_to in unreadable:
        _log(f"warning: checkpoint at step {bad_step} is unreadable ({reason}); "
             f"moved to {moved_to}, resuming from the previous one")
    if safe:
        with open(os.path.join(workdir, "resumes.jsonl"), "a") as f:
            f.write(json.dumps({"changes": {k: list(v) for k, v in safe.items()}}) + "\n")
    return restored, step


def progress():
    """Where data preparation and BPE learning say what they do: process 0's log, else nowhere."""
    return tqdm.write if jax.process_index() == 0 else None


def this_host() -> dict:
    """Which slice of the data this process reads: the data pipelines' keyword arguments."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def num_devices_and_mesh(config):
    parallelism = config.train.parallelism
    mesh = make_mesh(config.train.mesh.data, config.train.mesh.fsdp) if parallelism == "mesh" else None
    num_devices = {"jit": 1, "pmap": jax.local_device_count() * jax.process_count()}.get(
        parallelism, jax.device_count())
    return num_devices, mesh


class _Interval:
    """The train metrics of each step since the last log step, which the log reports as means
    (the loss of one batch is noisy), and the lr and the last batch's loss as they stand. Saved
    beside a checkpoint taken between log steps, so that a resumed run logs the same means."""

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, "log_interval.json")
        self.rows = []
        if resume_step and os.path.exists(self.path):
            with open(self.path) as f:
                saved = json.load(f)
            if saved["step"] == resume_step:
                self.rows = saved["rows"]

    def add(self, metrics: dict) -> None:
        self.rows.append(metrics)

    def save(self, step: int) -> None:
        self.rows = jax.device_get(self.rows)
        if jax.process_index() == 0:
            rows = [{k: float(v) for k, v in r.items()} for r in self.rows]
            common.write_json_atomic(self.path, {"step": step, "rows": rows})

    def means(self) -> dict:
        """{"train/loss": mean over the interval, ...}, skipped (non-finite) steps left out."""
        rows = [{k: float(v) for k, v in r.items()} for r in jax.device_get(self.rows)]
        self.rows = []
        kept = [r for r in rows if not r.get("skipped")] or rows
        means = {f"train/{k}": float(np.mean([r[k] for r in kept])) for k in kept[-1]
                 if k not in ("lr", "skipped")}
        return {**means, "train/lr": rows[-1]["lr"], "train/last_batch_loss": rows[-1]["loss"]}


def _header(config, num_devices: int, dtype: str, peak: float, peak_source: str, workdir: str) -> str:
    """What a run is about to do, and where it writes: the second line of every run's log."""
    devices = jax.devices()
    t = config.train
    return (f"{num_devices} of {len(devices)} {devices[0].platform} device(s) "
            f"({devices[0].device_kind}), {t.parallelism} | compute {dtype} | "
            f"peak {peak:.3g} FLOP/s per device ({peak_source}) | log every {t.log_every} steps "
            f"(train metrics: means over the interval), evaluate every {t.eval_every} and at the "
            f"last step | writing to {workdir}")


def run(config, workdir: str, job: Job, num_devices: int, mesh) -> dict:
    """The training loop: resume, train, log, evaluate, checkpoint, stop on SIGTERM. The
    caller has checked `workdir` (common.prepare_workdir) before any data work."""
    total_steps = config.train.steps
    model_cfg = job.model.cfg
    tx, schedule = make_optimizer(config.optim, total_steps, job.model.ops)
    compiler_options = common.kernels(config)[1]
    eval_rows = len(jax.tree_util.tree_leaves(job.eval_batches[0])[0]) * jax.process_count()
    steps = make_steps(job.model, schedule, config.train.parallelism, config.train.grad_accum_steps,
                       loss=job.loss, evaluate=job.evaluate,
                       skip_nonfinite=config.train.skip_nonfinite, poison_step=config.train.poison_step,
                       eval_micro_batches=eval_rows // (num_devices * eval_micro_batch(config, num_devices)),
                       mesh=mesh, compiler_options=compiler_options)
    state = create_state(job.model, tx, config.train.seed, job.seq_len, steps.shardings)
    if job.initial_params is not None:
        state = state.replace(params=job.initial_params(state.params))
    train_iter, eval_batches = job.train_iter, job.eval_batches
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_ckpts,
                        keep_best=config.train.keep_best)
    recorded = {**config.to_dict(), "corpus": job.corpus}
    state, resumed_step = _resume(ckpt, state, train_iter, recorded, workdir)
    start_step = resumed_step or 0
    if jax.process_index() == 0:
        common.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())

    n_params = flops.count_params(state.params)
    flops_per_tok = flops.flops_per_token(model_cfg, n_params, job.seq_len)
    peak_per_device, peak_source = flops.peak_flops(model_cfg.dtype, config.train.peak_flops,
                                                    job.model.ops, compiler_options)
    peak = peak_per_device * num_devices
    tokens_per_step = job.tokens_per_step
    writer = common.MetricWriter(workdir, resume_step=start_step, enabled=jax.process_index() == 0,
                                 wandb_project=config.train.wandb, config=config.to_dict())
    _log(f"{n_params:,} parameters | {flops_per_tok / 1e6:.1f} MFLOPs/token | "
               f"{total_steps:,} steps of {tokens_per_step:,} tokens | "
               f"{job.origin if resumed_step is None else f'resuming from step {resumed_step}'}")
    _log(_header(config, num_devices, model_cfg.dtype, peak_per_device, peak_source, workdir))

    device_state = steps.put_state(state)
    last = {}
    interval = _Interval(workdir, start_step)  # the train metrics of the steps since the last log
    bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    timer_step, timer = start_step, None
    with contextlib.ExitStack() as cleanup:  # on the way out, in reverse order:
        preemption = _Preemption()
        cleanup.callback(preemption.restore)  # last: only once the saves have committed
        cleanup.callback(writer.close)
        cleanup.callback(ckpt.close)  # waits for the save in flight to commit
        cleanup.callback(bar.close)
        for step in range(start_step + 1, total_steps + 1):
            device_state, metrics = steps.train(device_state, steps.put_batch(next(train_iter)))
            interval.add(metrics)
            if timer is None:  # exclude compilation from the throughput
                jax.block_until_ready(metrics)
                timer_step, timer = step, time.perf_counter()
            bar.update(1)
            is_log = step % config.train.log_every == 0 or step == total_steps
            is_eval = step % config.train.eval_every == 0 or step == total_steps
            preempted = preemption.received  # read once: a signal may land mid-iteration
            is_ckpt = step % config.train.ckpt_every == 0 or step == total_steps or preempted
            if (is_log or is_ckpt) and not config.train.skip_nonfinite:
                metrics = jax.device_get(metrics)  # a non-finite state is never logged as healthy nor saved
                if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
                    writer.write(step, {"train/loss": float(metrics["loss"]),
                                        "train/grad_norm": float(metrics["grad_norm"]), "diverged": True})
                    raise Diverged(f"non-finite loss or gradient at step {step}; last good checkpoint: "
                                   f"step {ckpt.latest_step() or 'none'} in {workdir}")

            row = {}
            if is_log:
                elapsed = time.perf_counter() - timer
                tokens_per_s = (step - timer_step) * tokens_per_step / elapsed if step > timer_step else 0.0
                achieved = tokens_per_s * flops_per_tok
                if achieved > peak:
                    _log(f"warning: the train step ran at {achieved:.3g} FLOP/s, above the peak "
                         f"{peak:.3g} ({peak_source}); MFU is measured against this rate from here on")
                    peak, peak_source = achieved, "the fastest train step"
                row = {**interval.means(), "train/tokens_per_s": tokens_per_s,
                       "train/mfu": achieved / peak, "train/peak_flops_per_device": peak / num_devices}
            if is_eval:
                eval_start = time.perf_counter()
                row.update(evaluate(steps, device_state, eval_batches, job.summarize))
                if timer is not None:  # evaluation is not training time
                    timer += time.perf_counter() - eval_start
            if row:
                last.update(row)
                writer.write(step, row)
                bar.set_postfix(loss=f"{last.get('train/loss', float('nan')):.3f}",
                                tok_s=f"{last.get('train/tokens_per_s', 0.0):,.0f}")
                _log(f"step {step:>7} | " + " | ".join(f"{k} {v:.4g}" for k, v in row.items()))
            if is_log:
                timer_step, timer = step, time.perf_counter()

            if is_ckpt:
                ckpt.save(step, steps.host_state(device_state), train_iter, recorded,
                          metrics=last if is_eval else None)
                interval.save(step)
            if preempted:
                ckpt.finish()
                _log(f"{preempted}: saved a checkpoint at step {step}; rerun the command to resume")
                break
        else:
            if not last:  # nothing left to train: report where the run stands
                last = evaluate(steps, device_state, eval_batches, job.summarize)
                _log(f"already trained to step {start_step}; "
                     + " | ".join(f"{k} {v:.4g}" for k, v in last.items()))
    return last


def config_for_run(argv, config, example: str):
    """A training program's first steps: check the command line, join the other hosts."""
    common.require_config(argv, config, example)
    if config.train.distributed:
        initialize_distributed(config.train)
    return config


def run_program(main) -> None:
    """common.run_program, plus exit status 3 (with the error line) when training diverged."""

    def main_or_diverged(argv):
        try:
            main(argv)
        except Diverged as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(3)

    common.run_program(main_or_diverged)
