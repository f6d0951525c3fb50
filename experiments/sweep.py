"""Run a sweep: each run of a sweep config is trained by experiments.train into WORKDIR/<run name>/,
then WORKDIR/report.{md,csv,png} are rebuilt from the runs' metrics.jsonl.

python -m experiments.sweep --config=configs/sweeps/norm_placement.py:tiny --workdir=runs/np \
    [--dry_run] [--only=PATTERN] [--report_only]

Rerunning the same command skips finished runs and resumes an interrupted one, so a killed
sweep is restarted by running it again. `--dry_run` prints each run's training command, to
launch runs on separate machines; copy their workdirs back and `--report_only` reports them.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

from experiments import common
from gpt import sweeps
from gpt.config import resume_changes, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file[:arg] (configs/sweeps/).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs (one per subdirectory) and the report.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print one training command per run; run nothing.")
_ONLY = flags.DEFINE_string("only", "", "Runs to train or print: a regular expression searched for in "
                            "the run name, or where it is not one ('*post*'), a glob on the whole name.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Rebuild the report from the runs on disk; train nothing.")

EXIT_DIVERGED, EXIT_USAGE = 3, 2  # experiments.train's exit statuses


def train_args(sweep, run: sweeps.Run, workdir: str) -> list[str]:
    """The run's command after `python`: what --dry_run prints and what the sweep launches."""
    return ["-m", "experiments.train", f"--config={sweep.base}",
            f"--workdir={os.path.join(workdir, run.name)}",
            *(f"--config.{key}={value}" for key, value in run.overrides)]


def run_config(run: sweeps.Run, args: list[str]):
    """The config experiments.train will build from `args`, parsed by the same flag code, so a
    mistake anywhere in the sweep stops it before the first run starts."""
    argv = ["train", *(a for a in args if a.startswith("--config"))]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    try:
        flag_values(argv)
        config = flag_values.config
        validate(config)
    except (AttributeError, KeyError) as e:
        raise ValueError(f"run {run.name}: {common.unknown_override(e, argv)}") from None
    except (flags.Error, ValueError) as e:
        raise ValueError(f"run {run.name}: {common.last_line(e)}") from None
    return config


def _metrics(workdir: str, run: sweeps.Run) -> list[dict]:
    path = os.path.join(workdir, run.name, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _resolved_config(workdir: str, run: sweeps.Run) -> dict | None:
    """The config.json experiments.train wrote: the run's config as it ran."""
    path = os.path.join(workdir, run.name, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _train(args: list[str]) -> tuple[int, str, bool]:
    """Runs one training command with its output shown as it comes; returns its exit status,
    its last `error:` line, and whether the sweep got a SIGTERM meanwhile. That SIGTERM goes
    on to the run, which checkpoints and exits."""
    proc = subprocess.Popen([sys.executable, *args], stderr=subprocess.PIPE)
    terminated = False

    def forward(signum, frame):
        nonlocal terminated
        terminated = True
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    tail = b""
    try:
        for chunk in iter(lambda: proc.stderr.read1(1 << 16), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-8192:]
    finally:
        signal.signal(signal.SIGTERM, previous)
    errors = [line for line in tail.decode(errors="replace").splitlines() if line.startswith("error: ")]
    return proc.wait(), errors[-1].removeprefix("error: ") if errors else "", terminated


def _status(run: sweeps.Run, config, workdir: str) -> str:
    """new, partial, done or diverged, against train.steps or, where train.epochs sets them,
    the steps the run resolved them to."""
    steps = config.train.steps
    if config.train.epochs:
        resolved = _resolved_config(workdir, run)
        steps = resolved["train"]["steps"] if resolved else math.inf
    return sweeps.progress(_metrics(workdir, run), steps)


def _check_unchanged(run: sweeps.Run, config, workdir: str) -> None:
    """experiments.train refuses to resume a run whose config changed in a way its checkpoints
    cannot take; a finished run is skipped without launching it, so the sweep applies the same
    rule first, rather than report results of a config it no longer has."""
    ran_with = _resolved_config(workdir, run)
    if ran_with:
        unsafe, _ = resume_changes(ran_with, json.loads(json.dumps(config.to_dict())))
        if unsafe:
            key, (old, new) = next(iter(unsafe.items()))
            raise ValueError(f"run {run.name}: {os.path.join(workdir, run.name)} was made with "
                             f"{key}={old!r}, the sweep now gives {new!r}; remove it or use a new --workdir")


def run_sweep(plans, workdir: str) -> list[str]:
    """Trains each (run, command, config) not yet finished; returns the names of runs that crashed."""
    for run, _, config in plans:
        _check_unchanged(run, config, workdir)
    crashed = []
    for k, (run, args, config) in enumerate(plans, 1):
        head = f"[{k}/{len(plans)}] {run.name}"
        status = _status(run, config, workdir)
        if status in ("done", "diverged"):
            print(f"{head}: {status}, skipped", flush=True)
            continue
        print(f"{head}: {'resuming' if status == 'partial' else 'starting'}\n"
              f"  {shlex.join(['python', *args])}", flush=True)
        code, error, terminated = _train(args)
        if terminated or (code == 0 and _status(run, config, workdir) != "done"):
            print(f"{head}: stopped by SIGTERM; rerun the sweep to resume", flush=True)
            break
        if code == EXIT_USAGE:
            raise ValueError(f"run {run.name}: {error}")
        if code == EXIT_DIVERGED:
            print(f"{head}: diverged at step {sweeps.diverged_at(_metrics(workdir, run))}; "
                  "recorded, continuing", flush=True)
        elif code:
            print(f"{head}: crashed with exit status {code}; continuing", flush=True)
            crashed.append(run.name)
    return crashed


# report.md's columns: a row's key and its heading; train_steps is shown with last_step
_HEADINGS = {"run": "run", "overrides": "overrides", "parameters": "parameters", "last_step": "steps",
             "final_train_loss": "final train loss", "final_eval_loss": "final eval loss",
             "best_eval_loss": "best eval loss", "diverged_at_step": "diverged",
             "tokens_per_s": "tokens/s (median)"}
_TEXT_COLUMNS = ("run", "overrides", "diverged_at_step")  # left-aligned; numbers go right


def _cell(row: dict, key: str) -> str:
    value = row[key]
    if key == "parameters":
        return f"{value:,}"
    if key == "last_step":
        return f"{value}/{row['train_steps']}"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if key == "diverged_at_step":
        return "no" if value is None else f"yes (step {value})"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown(title: str, base: str, fixed, rows: list[dict]) -> str:
    fixed = ", ".join(f"`{key}={value}`" for key, value in fixed)
    lines = [f"# {title}", "",
             f"Base config `{base}`" + (f"; for every run {fixed}" if fixed else "") + ".", "",
             "![eval loss per run](report.png)", "",
             "| " + " | ".join(_HEADINGS.values()) + " |",
             "|" + "|".join("---" if key in _TEXT_COLUMNS else "---:" for key in _HEADINGS) + "|"]
    lines += ["| " + " | ".join(_cell(row, key) for key in _HEADINGS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _plot(path: str, rows: list[dict], curves: list[tuple[list[int], list[float]]]) -> None:
    from matplotlib.figure import Figure  # Agg, no display: a Figure without pyplot
    from matplotlib.transforms import blended_transform_factory

    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for row, (steps, losses) in zip(rows, curves):
        diverged = row["diverged_at_step"]
        label = row["run"] + ("" if diverged is None else f" (diverged at step {diverged})")
        (line,) = ax.plot(steps, losses, marker=".", label=label)
        if diverged is not None:  # the curve stops here; an x where training blew up
            if losses:
                ax.plot([steps[-1], diverged], [losses[-1]] * 2, ls=":", color=line.get_color())
                ax.plot(diverged, losses[-1], "x", ms=10, mew=2, color=line.get_color())
            else:  # diverged before its first evaluation: mark the step on the top edge
                ax.plot(diverged, 1.0, "x", ms=10, mew=2, color=line.get_color(), clip_on=False,
                        transform=blended_transform_factory(ax.transData, ax.transAxes))
    ax.set(xlabel="step", ylabel="eval loss (nats/token)", title="Eval loss per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=110)


def write_report(spec: str, sweep, runs: list[sweeps.Run], workdir: str) -> int:
    """report.md, report.csv and report.png from the runs' config.json and metrics.jsonl;
    returns how many runs have results (none: no report)."""
    rows, curves = [], []
    for run in runs:
        records = _metrics(workdir, run)
        if records:
            rows.append(sweeps.summarize(run, _resolved_config(workdir, run), records))
            curves.append(sweeps.eval_curve(records))
    if not rows:
        return 0
    with open(os.path.join(workdir, "report.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(_markdown(f"Sweep `{spec}`: {len(rows)} of {len(runs)} runs", sweep.base,
                          runs[0].fixed, rows))
    _plot(os.path.join(workdir, "report.png"), rows, curves)
    return len(rows)


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise ValueError("--config is required, e.g. --config=configs/sweeps/norm_placement.py:tiny")
    if not _WORKDIR.value:
        raise ValueError("--workdir is required: a directory for the runs and the report")
    sweep, workdir = _CONFIG.value, _WORKDIR.value
    runs = sweeps.expand(sweep)
    chosen = sweeps.select(runs, _ONLY.value) if _ONLY.value else runs
    if not chosen:
        raise ValueError(f"--only={_ONLY.value} matches no run; runs: {', '.join(r.name for r in runs)}")
    crashed = []
    if not _REPORT_ONLY.value:
        commands = [train_args(sweep, run, workdir) for run in chosen]
        plans = [(run, args, run_config(run, args)) for run, args in zip(chosen, commands)]
        if _DRY_RUN.value:
            print("\n".join(shlex.join(["python", *args]) for args in commands))
            return
        common.prepare_workdir(workdir)  # checked; commands keep the path as given, like --dry_run's
        crashed = run_sweep(plans, workdir)
    n = write_report(config_flags.get_config_filename(flags.FLAGS["config"]), sweep, runs, workdir)
    if n:
        print(f"report of {n} of {len(runs)} runs: {os.path.join(workdir, 'report.md')} (.csv, .png)")
    elif _REPORT_ONLY.value:
        raise FileNotFoundError(f"--workdir={workdir} holds no runs of this sweep yet")
    if crashed:
        print(f"error: {len(crashed)} run(s) crashed: {', '.join(crashed)} (their output is above)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    common.run_program(main)
