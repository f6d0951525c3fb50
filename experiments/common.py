"""What every program shares: the error contract, the workdir and the metric writers."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import sys
import time
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
    """ml_collections' KeyError (sometimes wrapped in an AttributeError) names the missing
    component in quotes, then 'Did you mean "x"'; turn it into one line naming the override."""
    while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    missing = re.match(r"'([^']+)'", text)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    for arg in argv:
        path = arg.split("=", 1)[0]
        parts = path.removeprefix("--config.").split(".")
        if not path.startswith("--config.") or missing is None or missing[1] not in parts:
            continue
        if suggestion is None:
            return f"{path}: no such key (the config file lists its keys)"
        parts[parts.index(missing[1])] = suggestion[1]
        return f"{path}: no such key; did you mean {'.'.join(parts)}?"
    return f"--config override: {text.splitlines()[-1] if text.strip() else type(e).__name__}"


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def print_help(full: bool) -> None:
    """absl's help: the program's docstring and flags (--helpfull: every library's flags too)."""
    from absl import app

    app.usage(shorthelp=not full, writeto_stdout=True)
    if not full:
        print(flags.FLAGS.module_help(sys.modules[__name__]))
        if "config" in flags.FLAGS:
            print("\nAny config key can be overridden: --config.SECTION.KEY=VALUE (the config file lists them).")
        print("Try --helpfull to list every library's flags too.")


def run_program(main) -> None:
    """Parses flags and runs `main(argv)`. A user's mistake ends in one `error: ...` line and
    exit status 2; --verbose shows the traceback and the libraries' logs (orbax and tfds
    log every file they touch, and warn about their own internals). --help, -h and
    --helpfull print the flags and exit 0."""
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches a log file or a sweep as it happens
    args = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
    asked = [arg for arg in args if arg in HELP_FLAGS]
    if asked:
        print_help(full="--helpfull" in asked)
        sys.exit(0)
    argv = sys.argv
    try:
        argv = flags.FLAGS(sys.argv)
    except (AttributeError, KeyError) as e:
        _fail(unknown_override(e, sys.argv))
    except (flags.Error, ValueError, OSError) as e:
        _fail(last_line(e))
    if not VERBOSE.value:
        logging.set_verbosity(logging.ERROR)
        # orbax logs a traceback for each failure it then raises (four for one full disk):
        # the raised error reaches the user as one line.
        logging.get_absl_logger().addFilter(lambda record: "/orbax/" not in record.pathname)
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
    _lock(workdir)
    return workdir


_HELD_LOCKS = {}  # workdir -> the open lock file: the lock lasts as long as this process


def _lock(workdir: str) -> None:
    """One program at a time per workdir: two runs would write over each other's checkpoints
    and metrics. flock is released by the kernel when the holder dies, however it dies, so a
    lock is never stale. Only process 0 of a multi-host run locks (they share the workdir)."""
    import fcntl

    import jax

    if jax.process_index() != 0 or workdir in _HELD_LOCKS:
        return
    lock_file = open(os.path.join(workdir, ".lock"), "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise OSError(f"--workdir={workdir} is in use by another program (process {holder}); "
                      "wait for it to end or use another --workdir") from None
    lock_file.truncate(0)
    lock_file.write(str(os.getpid()))
    lock_file.flush()
    _HELD_LOCKS[workdir] = lock_file


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def check_vocabulary(tokenizer, config) -> None:
    """Refuses a tokenizer with ids the model's embedding lacks: jnp.take would read NaN
    for them, and training, evaluation and sampling would go on with NaN losses."""
    from gpt.config import ConfigError

    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError("model.vocab_size", f"at least data.tokenizer={config.data.tokenizer}'s "
                          f"{tokenizer.vocab_size} ids (the embedding has a row per id)",
                          config.model.vocab_size)


def kernels(config):
    """(gpt.ops bundle, XLA compiler options) for a run's steps. train.kernels=auto: gpt/cpu's
    kernels, which run where a step is lowered for CPU (XLA's ops elsewhere), and its compiler
    options on a CPU backend; a subset (gpt.config.cpu_kernels): those; none, or gpt/cpu absent: XLA's ops and
    options everywhere. A mesh over several devices keeps XLA's ops, which its partitioner can
    split."""
    import jax

    from gpt.config import cpu_kernels
    from gpt.ops import REFERENCE

    chosen = cpu_kernels(config.train.get("kernels", "auto"))
    if not chosen or (config.train.parallelism == "mesh" and jax.device_count() > 1):
        return REFERENCE, {}
    try:
        from gpt import cpu
    except ImportError:
        return REFERENCE, {}
    if jax.default_backend() == "cpu" and not cpu.build.library_path().exists():
        print(f"compiling the C++ CPU kernels (once per machine, about a minute; cached in "
              f"{cpu.build.library_path().parent})")
    options = dict(cpu.CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}
    return cpu.ops(kernels=chosen), options


def load_run(workdir: str, step: int | None = None):
    """The resolved config, model and parameters of a training run's checkpoint (by default
    the newest readable one, as a resumed run picks, with a `warning:` line for each newer
    unreadable one, left where it is): what sampling, evaluation and fine-tuning start from."""
    import jax
    import ml_collections

    from gpt.checkpoint import Checkpointer, Unreadable
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
    if step is not None and step not in ckpt.all_steps() or not ckpt.all_steps():
        raise FileNotFoundError(f"--workdir={workdir}: no checkpoint for step {step} "
                                f"(have: {ckpt.all_steps() or 'none'})")
    model = GPT(model_config(config), kernels(config)[0])
    tx, _ = make_optimizer(config.optim, config.train.steps)
    abstract = jax.eval_shape(lambda: create_state(model, tx, config.train.seed, config.data.seq_len))
    try:
        if step is None:
            state, step, unreadable = ckpt.restore_latest_valid(abstract, move_aside=False)
            for bad_step, reason, _ in unreadable:
                to_stderr(f"warning: checkpoint at step {bad_step} is unreadable ({reason}); "
                          f"using step {step}")
        else:
            state = ckpt.restore(step, abstract)
    except Unreadable as e:
        raise OSError(f"--workdir={workdir}: the checkpoint at step {step} is unreadable ({e})") from None
    finally:
        ckpt.close()
    return config, model, state.params


def _logged_lines(path: str, up_to_step: int) -> list[str]:
    """The lines of metrics.jsonl at steps <= `up_to_step`; a last line cut short by a kill
    mid-write is dropped, any other line that is not JSON is an error."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not a JSON object with a \"step\"; "
                             "remove the line to resume") from None
        if step <= up_to_step:
            kept.append(line)
    return kept


class MetricWriter:
    """metrics.jsonl (one object per logged step, with the wall-clock time and the seconds
    the run has trained so far), TensorBoard event files flushed at every row (so they can be
    watched, and survive a kill), and optionally a Weights & Biases run (`wandb_project`).
    Both files are written in the calling thread, so a failed write (a full disk) raises
    OSError here, as one line that says what is kept.

    On resume, lines past the restored step (written after the last checkpoint by the
    interrupted run) are dropped so the log reads as one uninterrupted run, and the elapsed
    seconds continue from the last kept line."""

    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True,
                 wandb_project: str = "", config: dict | None = None):
        self.enabled = enabled
        if not enabled:  # another process of a multi-host run writes the logs
            return
        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = _logged_lines(self.path, resume_step)
        with self._writing():
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
            self.jsonl = open(self.path, "a")
            self.tb = _EventFile(os.path.join(workdir, "tensorboard"))
        self.start = time.monotonic() - (json.loads(kept[-1]).get("elapsed_s", 0.0) if kept else 0.0)
        self.wandb = _wandb_run(wandb_project, workdir, config) if wandb_project else None

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as e:
            raise OSError(f"cannot write the metrics in {os.path.dirname(self.path)} ({e.strerror or e}); "
                          "the checkpoints saved so far are kept: rerun the command to resume") from None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        when = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "elapsed_s": round(time.monotonic() - self.start, 3)}
        with self._writing():
            self.jsonl.write(json.dumps({"step": step, **metrics, **when}) + "\n")
            self.jsonl.flush()
            self.tb.write(step, metrics)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        with self._writing():
            self.jsonl.close()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class _EventFile:
    """TensorBoard scalars, on disk when `write` returns: tensorboardX's SummaryWriter hands
    events to a background thread, and its flush() does not wait for them."""

    def __init__(self, logdir: str):
        from tensorboardX.event_file_writer import EventsWriter

        os.makedirs(logdir, exist_ok=True)
        self.events = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}")  # one file per run

    def write(self, step: int, metrics: dict) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for key, value in metrics.items():
            self.events.write_event(Event(wall_time=time.time(), step=step, summary=scalar(key, value)))
        self.events.flush()

    def close(self) -> None:
        self.events.close()


def _wandb_run(project: str, workdir: str, config: dict | None):
    """A Weights & Biases run named after the workdir; a resumed run continues the same W&B
    run (its id is kept in the workdir). wandb is optional: imported only when asked for."""
    try:
        import wandb
    except ImportError:
        raise ValueError(f"train.wandb={project!r} needs the wandb package: "
                         "pip install -r requirements-dev.txt (or pip install wandb)") from None
    id_path = os.path.join(workdir, "wandb_id")
    run_id = None
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    run = wandb.init(project=project, dir=workdir, name=os.path.basename(workdir), id=run_id,
                     resume="allow", config=config)
    with open(id_path, "w") as f:
        f.write(run.id)
    return run
