"""Run a sweep: each run of a sweep config is trained by experiments.train into WORKDIR/<run name>/,
then WORKDIR/report.{md,csv,png} are rebuilt from the runs' metrics.jsonl.

python -m experiments.sweep --config=configs/sweeps/norm_placement.py:tiny --workdir=runs/np \
    [--parallel=N] [--dry_run [--hosts=H]] [--only=PATTERN] [--report_only]

Rerunning the same command skips finished runs and resumes an interrupted one, so a killed
sweep is restarted by running it again. `--parallel=N` trains up to N runs at once, each on its
own share of this host's devices (GPUs by CUDA_VISIBLE_DEVICES, TPU chips by TPU_VISIBLE_CHIPS,
on a CPU its cores and forced host devices), each run's output in WORKDIR/<run>/train.log; the
report is rebuilt whenever a run ends. `--dry_run` prints each run's training command, and
writes WORKDIR/launch/: one script per host (`--hosts`) that runs that host's share of the sweep,
and a SLURM array script, one task per run; copy the workdirs back and `--report_only` reports them.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

from absl import flags
from ml_collections import config_flags

from experiments import common
from gpt import data, sweeps
from gpt.data import corpus
from gpt.config import resume_changes, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file[:arg] (configs/sweeps/).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs (one per subdirectory) and the report.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print one training command per run; run nothing.")
_ONLY = flags.DEFINE_string("only", "", "Runs to train or print: a regular expression searched for in "
                            "the run name, or where it is not one ('*post*'), a glob on the whole name.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Rebuild the report from the runs on disk; train nothing.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs trained at once, each on its own share of this host's "
                                 "devices; more than 1 sends each run's output to WORKDIR/<run>/train.log.")
_HOSTS = flags.DEFINE_integer("hosts", 1, "--dry_run: hosts to write WORKDIR/launch/host_<i>.sh for.")

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


@dataclasses.dataclass(frozen=True)
class Share:
    """One run's part of this host: what it is called, environment overrides, CPUs to run on."""

    name: str
    env: dict
    cpus: tuple = ()


TPU_CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}  # chips per process -> x,y,z
TPU_FIRST_PORT = 8476
FORCED_DEVICES = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def _split(items: list, n: int, what: str) -> list[list]:
    if len(items) < n:
        raise ValueError(f"--parallel={n} is not allowed: at most the {len(items)} {what} of this host")
    k = len(items) // n
    return [items[i * k:(i + 1) * k] for i in range(n)]


def _gpus(environ) -> list[str]:
    if environ.get("CUDA_VISIBLE_DEVICES"):
        return environ["CUDA_VISIBLE_DEVICES"].split(",")
    if not shutil.which("nvidia-smi"):
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def device_shares(n: int, environ=os.environ) -> list[Share]:
    """n disjoint shares of this host's devices, found without starting JAX (which would take
    the accelerators): GPUs, else TPU chips (/dev/accel*, /dev/vfio/N), else the CPU's cores,
    each share with its part of the forced host devices (XLA_FLAGS) for runs that want several."""
    gpus = _gpus(environ)
    if gpus:
        return [Share(f"GPU {','.join(g)}", {"CUDA_VISIBLE_DEVICES": ",".join(g)})
                for g in _split(gpus, n, "GPUs")]
    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    if chips:
        groups = _split([str(i) for i in range(len(chips))], n, "TPU chips")
        if len(groups[0]) not in TPU_CHIP_BOUNDS:
            raise ValueError(f"--parallel={n} is not allowed: {len(chips)} TPU chips split into shares of "
                             f"{', '.join(map(str, TPU_CHIP_BOUNDS))} chips")
        return [Share(f"TPU chips {','.join(g)}", {
            "TPU_VISIBLE_CHIPS": ",".join(g), "TPU_CHIPS_PER_PROCESS_BOUNDS": TPU_CHIP_BOUNDS[len(g)],
            "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_PORT": str(TPU_FIRST_PORT + i),
            "TPU_PROCESS_ADDRESSES": f"localhost:{TPU_FIRST_PORT + i}", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
            for i, g in enumerate(groups)]
    xla_flags = environ.get("XLA_FLAGS", "")
    forced = FORCED_DEVICES.search(xla_flags)
    per_run = max(1, int(forced.group(1)) // n) if forced else 1
    flags_each = FORCED_DEVICES.sub("", xla_flags).strip() + f" --xla_force_host_platform_device_count={per_run}"
    return [Share(f"CPUs {','.join(map(str, cpus))} ({per_run} host device{'s' if per_run > 1 else ''})",
                  {"XLA_FLAGS": flags_each.strip()}, tuple(cpus))
            for cpus in _split(sorted(os.sched_getaffinity(0)), n, "CPUs")]


class _Training:
    """One training command running in the background. Its stderr is relayed to `out` (the
    terminal, or with stdout the run's log) with its last bytes kept for the `error:` line."""

    def __init__(self, args: list[str], share: Share | None, log: str | None):
        env = dict(os.environ, **share.env) if share else None
        self.log = open(log, "ab") if log else None  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, *args], env=env, stdout=self.log, stderr=subprocess.PIPE,
            preexec_fn=(lambda: os.sched_setaffinity(0, share.cpus)) if share and share.cpus else None)
        self.tail = b""
        out = self.log or sys.stderr.buffer
        self._relay = threading.Thread(target=self._copy, args=(out,), daemon=True)
        self._relay.start()

    def _copy(self, out) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(1 << 16), b""):
            out.write(chunk)
            out.flush()
            self.tail = (self.tail + chunk)[-8192:]

    def wait(self) -> tuple[int, str]:
        """(exit status, its last `error:` line)."""
        code = self.proc.wait()
        self._relay.join()
        if self.log:
            self.log.close()
        errors = [line for line in self.tail.decode(errors="replace").splitlines() if line.startswith("error: ")]
        return code, errors[-1].removeprefix("error: ") if errors else ""


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


def run_sweep(plans, workdir: str, parallel: int = 1, on_run_end=lambda: None) -> list[str]:
    """Trains each (run, command, config) not yet finished, up to `parallel` at once on
    disjoint device shares, calling `on_run_end()` as each ends; returns the names of runs that
    crashed. A SIGTERM goes on to the running runs, which checkpoint and exit; no more start."""
    for run, _, config in plans:
        _check_unchanged(run, config, workdir)
    todo = []
    for k, (run, args, config) in enumerate(plans, 1):
        head = f"[{k}/{len(plans)}] {run.name}"
        status = _status(run, config, workdir)
        if status in ("done", "diverged"):
            print(f"{head}: {status}, skipped", flush=True)
        else:
            todo.append((head, run, args, config, status))
    free = device_shares(parallel) if parallel > 1 else [None]
    if parallel > 1:  # once, here: runs started together would each prepare the same data_dir
        prepared = []
        for *_, config, _ in todo:
            if config.data.to_dict() not in prepared:
                corpus.prepare(config.data, print)
                data.get_tokenizer(config.data, print)
                prepared.append(config.data.to_dict())
    running, crashed, terminated = {}, [], False

    def forward(signum, frame):
        nonlocal terminated
        terminated = True
        for training, *_ in running.values():
            training.proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while running or (todo and not terminated):
            while todo and free and not terminated:
                head, run, args, config, status = todo.pop(0)
                share = free.pop(0)
                log = os.path.join(workdir, run.name, "train.log") if share else None
                if log:
                    os.makedirs(os.path.dirname(log), exist_ok=True)
                print(f"{head}: {'resuming' if status == 'partial' else 'starting'}"
                      + (f" on {share.name}, output in {log}" if share else "")
                      + f"\n  {shlex.join(['python', *args])}", flush=True)
                running[head] = (_Training(args, share, log), run, config, share)
            ended = next((h for h, (t, *_) in running.items() if t.proc.poll() is not None), None)
            if ended is None:
                time.sleep(0.2)
                continue
            training, run, config, share = running.pop(ended)
            free.append(share)
            code, error = training.wait()
            if terminated or (code == 0 and _status(run, config, workdir) != "done"):
                print(f"{ended}: stopped by SIGTERM; rerun the sweep to resume", flush=True)
                terminated = True
            elif code == EXIT_USAGE:
                raise ValueError(f"run {run.name}: {error}")
            elif code == EXIT_DIVERGED:
                print(f"{ended}: diverged at step {sweeps.diverged_at(_metrics(workdir, run))}; "
                      "recorded, continuing", flush=True)
            elif code:
                print(f"{ended}: crashed with exit status {code}; continuing", flush=True)
                crashed.append(run.name)
            else:
                print(f"{ended}: done", flush=True)
            on_run_end()
    finally:
        signal.signal(signal.SIGTERM, previous)
        for training, *_ in running.values():  # a usage error above: the others stop too
            training.proc.terminate()
            training.wait()
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


def write_launch_scripts(spec: str, runs: list[sweeps.Run], commands: list[list[str]], workdir: str,
                         hosts: int, parallel: int) -> list[str]:
    """WORKDIR/launch/host_<i>.sh, each the sweep over runs i, i + hosts, ... (resumable, `parallel`
    at once on that host's devices), and slurm_array.sh, one array task per run; returns their paths."""
    launch = os.path.join(workdir, "launch")
    os.makedirs(launch, exist_ok=True)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = []
    for host in range(hosts):
        names = "|".join(re.escape(run.name) for run in runs[host::hosts])
        command = ["python", "-m", "experiments.sweep", f"--config={spec}", f"--workdir={workdir}",
                   f"--only=^({names})$", f"--parallel={parallel}"]
        paths.append(_write_script(os.path.join(launch, f"host_{host}.sh"), repo, [shlex.join(command)]))
    tasks = [f"  {shlex.quote(shlex.join(['python', *args]))}" for args in commands]
    paths.append(_write_script(
        os.path.join(launch, "slurm_array.sh"), repo,
        ["commands=(", *tasks, ")", 'eval "${commands[$SLURM_ARRAY_TASK_ID]}"'],
        directives=["#SBATCH --job-name=sweep", f"#SBATCH --array=0-{len(commands) - 1}"]))
    return paths


def _write_script(path: str, repo: str, lines: list[str], directives: tuple = ()) -> str:
    with open(path, "w") as f:
        f.write("\n".join(["#!/usr/bin/env bash", *directives, "# written by experiments.sweep --dry_run",
                           "set -euo pipefail", f"cd {shlex.quote(repo)}", *lines]) + "\n")
    os.chmod(path, 0o755)
    return path


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
    if _PARALLEL.value < 1 or _HOSTS.value < 1:
        raise ValueError(f"--parallel={_PARALLEL.value} / --hosts={_HOSTS.value} is not allowed: at least 1")
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    crashed = []
    if not _REPORT_ONLY.value:
        commands = [train_args(sweep, run, workdir) for run in chosen]
        plans = [(run, args, run_config(run, args)) for run, args in zip(chosen, commands)]
        if _DRY_RUN.value:
            print("\n".join(shlex.join(["python", *args]) for args in commands))
            common.prepare_workdir(workdir)
            for path in write_launch_scripts(spec, chosen, commands, workdir, _HOSTS.value, _PARALLEL.value):
                print(f"# {path}", file=sys.stderr)
            return
        common.prepare_workdir(workdir)  # checked; commands keep the path as given, like --dry_run's
        crashed = run_sweep(plans, workdir, _PARALLEL.value,
                            on_run_end=lambda: write_report(spec, sweep, runs, workdir))
    n = write_report(spec, sweep, runs, workdir)
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
