"""Draw the train and eval loss of one or several runs on one figure (a PNG).

python -m experiments.plot --workdir=runs/demo [runs/other ...] [--out=loss.png]

One run's figure goes to WORKDIR/loss.png, several runs' to ./loss.png, unless --out says where.
Each run is one colour: the train loss (the mean over each log interval) as a line, the eval
loss as dots on a dashed line.
"""
from __future__ import annotations

import json
import os

from absl import flags

from experiments import common

_WORKDIR = flags.DEFINE_multi_string("workdir", [], "A run's directory (more may follow as arguments)")
_OUT = flags.DEFINE_string("out", "", "Where to write the PNG (default: see above).")


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--workdir={workdir} holds no run: {path} is missing")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(workdirs: list[str]):
    """A matplotlib Figure of every run's train and eval loss against the step."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, workdir in enumerate(workdirs):
        rows = read_metrics(workdir)
        name = os.path.basename(os.path.normpath(workdir))
        color = f"C{i % 10}"
        for key, style in (("train/loss", {"linestyle": "-"}),
                           ("eval/loss", {"linestyle": "--", "marker": "o", "markersize": 3})):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, color=color, label=f"{name} {key.split('/')[0]}", **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv):
    workdirs = _WORKDIR.value + argv[1:]
    if not workdirs:
        raise ValueError("--workdir is required: a run's directory (several may follow)")
    out = _OUT.value or (os.path.join(workdirs[0], "loss.png") if len(workdirs) == 1 else "loss.png")
    fig = plot_runs(workdirs)
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise OSError(f"--out={out}: cannot write it ({e.strerror})") from None
    print(f"wrote {os.path.abspath(out)}")


if __name__ == "__main__":
    common.run_program(main)
