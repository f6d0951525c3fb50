"""What every program shares: the error contract, the workdir and the metric writers."""
from __future__ import annotations

import json
import os
import sys
import traceback

from absl import flags, logging

VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks for errors.")


def _fail(message: str, hint: str = "") -> None:
    print(f"error: {message}{hint}", file=sys.stderr)
    sys.exit(2)


def last_line(e: BaseException) -> str:
    """absl and ml_collections wrap the cause in several lines; the last one names it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    return last.removeprefix("ValueError: ")


def unknown_override(e: BaseException, argv) -> str:
    key = str(e).strip("\"' ")
    for arg in argv:
        path = arg.split("=", 1)[0]
        if path.startswith("--config.") and path.split(".")[-1] == key:
            return f"{path}: the config has no such key (see the config file for the keys it has)"
    return f"--config override: the config has no key {key!r}"


def run_program(main) -> None:
    """Parses flags and runs `main(argv)`. A user's mistake ends in one `error: ...` line and
    exit status 2; --verbose shows the traceback and the libraries' logs (orbax and tfds
    log every file they touch, and warn about their own internals)."""
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches a log file or a sweep as it happens
    argv = sys.argv
    try:
        argv = flags.FLAGS(sys.argv)
    except (AttributeError, KeyError) as e:
        _fail(unknown_override(e, sys.argv))
    except (flags.Error, ValueError, OSError) as e:
        _fail(last_line(e))
    if not VERBOSE.value:
        logging.set_verbosity(logging.ERROR)
    try:
        main(argv)
    except (ValueError, OSError) as e:
        if VERBOSE.value:
            traceback.print_exc()
        _fail(last_line(e), "" if VERBOSE.value else " (--verbose shows the traceback)")


def to_stderr(line: str) -> None:
    """Progress for programs whose stdout is their result (JSON, a sample)."""
    print(line, file=sys.stderr)


def require_config(argv, config, example: str) -> None:
    """The checks every config-driven program makes first: no stray arguments, a --config."""
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    if config is None:
        raise ValueError(f"--config is required, e.g. --config={example}")


def prepare_workdir(workdir: str) -> str:
    if not workdir:
        raise ValueError("--workdir is required: a directory for config, logs and checkpoints")
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise OSError(f"--workdir={workdir} is not a writable directory ({e.strerror})") from None
    return workdir


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def kernels(config):
    """(gpt.ops bundle, XLA compiler options) for a run's steps. train.kernels=auto: gpt/cpu's
    kernels, which run where a step is lowered for CPU (XLA's ops elsewhere), and its compiler
    options on a CPU backend; none, or gpt/cpu absent: XLA's ops and options everywhere. A mesh
    over several devices keeps XLA's ops, which its partitioner can split."""
    import jax

    from gpt.ops import REFERENCE

    if (config.train.get("kernels", "auto") == "none"
            or (config.train.parallelism == "mesh" and jax.device_count() > 1)):
        return REFERENCE, {}
    try:
        from gpt import cpu
    except ImportError:
        return REFERENCE, {}
    options = dict(cpu.CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}
    return cpu.ops(), options


def load_run(workdir: str, step: int | None = None):
    """The resolved config, model and parameters of a training run's checkpoint (latest by
    default): what sampling, evaluation and fine-tuning start from."""
    import jax
    import ml_collections

    from gpt.checkpoint import Checkpointer
    from gpt.config import model_config
    from gpt.model import GPT
    from gpt.optim import make_optimizer
    from gpt.train_step import create_state

    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--workdir={workdir} holds no run: {config_path} is missing")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = step if step is not None else ckpt.latest_step()
    if step is None or step not in ckpt.manager.all_steps():
        raise FileNotFoundError(f"--workdir={workdir}: no checkpoint for step {step} "
                                f"(have: {sorted(ckpt.manager.all_steps()) or 'none'})")
    model = GPT(model_config(config), kernels(config)[0])
    tx, _ = make_optimizer(config.optim, config.train.steps)
    abstract = jax.eval_shape(lambda: create_state(model, tx, config.train.seed, config.data.seq_len))
    params = ckpt.restore(step, abstract).params
    ckpt.close()
    return config, model, params


class MetricWriter:
    """metrics.jsonl (one object per logged step) plus TensorBoard event files.

    On resume, lines past the restored step (written after the last checkpoint by the
    interrupted run) are dropped so the log reads as one uninterrupted run."""

    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
        from tensorboardX import SummaryWriter

        self.enabled = enabled
        if not enabled:  # another process of a multi-host run writes the logs
            return
        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        self.jsonl = open(self.path, "a")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        self.tb.close()
