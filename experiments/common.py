"""What every program shares: the error contract, the workdir and the metric writers."""
from __future__ import annotations

import json
import os
import sys
import traceback

from absl import flags, logging

VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks for errors.")


def run_main(main, argv) -> None:
    """A user's mistake ends in one `error: ...` line and exit status 2; --verbose shows the
    traceback and the libraries' own logs (orbax and tfds log every file they touch)."""
    if not VERBOSE.value:
        logging.set_verbosity(logging.WARNING)
    try:
        main(argv)
    except (ValueError, OSError) as e:
        if VERBOSE.value:
            traceback.print_exc()
        hint = "" if VERBOSE.value else " (--verbose shows the traceback)"
        print(f"error: {e}{hint}", file=sys.stderr)
        sys.exit(2)


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


class MetricWriter:
    """metrics.jsonl (one object per logged step) plus TensorBoard event files.

    On resume, lines past the restored step (written after the last checkpoint by the
    interrupted run) are dropped so the log reads as one uninterrupted run."""

    def __init__(self, workdir: str, resume_step: int = 0):
        from tensorboardX import SummaryWriter

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
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()
