"""Sweeps: named runs from a base config and axes of overrides, and the numbers a report shows.

A sweep config (configs/sweeps/*.py) holds
  base       the experiment config every run starts from, "FILE[:arg]" as for experiments.train
  overrides  ((key, value), ...) fixed for every run, e.g. (("train.steps", 300),)
  variants   ((name, {key: value, ...}), ...) named sets of overrides, one run each
  zip        ((key, values), ...) lists of one length, varied together
  product    ((key, values), ...) every combination
all optional but `base`. Runs are variants x zip x product, the last product axis varying
fastest. Keys are spelled as on the command line ("model.n_layer"); ConfigDict fields cannot
hold dots, and pairs keep the author's order, which orders and names the runs.

Pure: experiments/sweep.py launches the runs, reads their files and writes the report.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import math
import re
import statistics

from gpt import flops
from gpt.config import GPTConfig

_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")  # what a directory name may hold, everywhere


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # from the varied overrides: short, filesystem-safe, unique within the sweep
    fixed: tuple[tuple[str, object], ...]  # the sweep's overrides for every run
    varied: tuple[tuple[str, object], ...]  # what sets this run apart

    @property
    def overrides(self) -> tuple[tuple[str, object], ...]:
        return self.fixed + self.varied


def _pairs(sweep, field: str, of: str) -> tuple[tuple[str, object], ...]:
    pairs = tuple(sweep.get(field) or ())
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ValueError(f"sweep config: {field} holds ({of}) pairs, e.g. "
                             f"(('model.n_layer', (2, 6)),); got {pair!r}")
    return pairs


def _axes(sweep, field: str) -> tuple[tuple[str, tuple], ...]:
    axes = tuple((key, tuple(values)) for key, values in _pairs(sweep, field, "key, values"))
    for key, values in axes:
        if not values:
            raise ValueError(f"sweep config: {field} axis {key} has no values")
    return axes


def _short_names(keys) -> dict[str, str]:
    """The last part of each key ("n_layer"), or the whole key where two would read alike."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def expand(sweep) -> list[Run]:
    """The runs of a sweep config, in order; raises ValueError for an ill-formed sweep."""
    if not sweep.get("base"):
        raise ValueError("sweep config: `base` is required, e.g. 'configs/gpt2.py:tiny'")
    fixed = _pairs(sweep, "overrides", "key, value")
    variants = tuple((name, tuple(dict(overrides).items()))
                     for name, overrides in _pairs(sweep, "variants", "name, {key: value}"))
    zipped, product = _axes(sweep, "zip"), _axes(sweep, "product")
    if len({len(values) for _, values in zipped}) > 1:
        raise ValueError("sweep config: zip axes need lists of one length; got "
                         + ", ".join(f"{key}: {len(values)}" for key, values in zipped))
    axis_keys = [key for key, _ in zipped + product]
    variant_keys = sorted({key for _, overrides in variants for key, _ in overrides})
    keys = [key for key, _ in fixed] + axis_keys + variant_keys
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"sweep config: {', '.join(repeated)} set twice; overrides, variants, "
                         "zip and product must set different keys")

    # Each group lists its choices as (label or None, overrides); a run takes one per group.
    groups = []
    if variants:
        groups.append([(name, overrides) for name, overrides in variants])
    if zipped:
        groups.append([(None, tuple((key, values[i]) for key, values in zipped))
                       for i in range(len(zipped[0][1]))])
    groups += [[(None, ((key, value),)) for value in values] for key, values in product]

    short = _short_names(axis_keys)
    runs = []
    for choice in itertools.product(*groups):
        parts = [label if label is not None else ",".join(f"{short[k]}={v}" for k, v in overrides)
                 for label, overrides in choice]
        varied = tuple(pair for _, overrides in choice for pair in overrides)
        runs.append(Run(_UNSAFE.sub("_", ",".join(parts)) or "base", fixed, varied))
    names = [run.name for run in runs]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(f"sweep config: several runs would be named {clashes[0]!r}; "
                         "give variants distinct names")
    return runs


def select(runs: list[Run], pattern: str) -> list[Run]:
    """The runs a pattern names: a regular expression searched for in the name ("post",
    "^norm_position=pre", "n_layer=6"), or where it is not one ("*post*"), a glob on the whole name."""
    try:
        regex = re.compile(pattern)
    except re.error:
        return [run for run in runs if fnmatch.fnmatchcase(run.name, pattern)]
    return [run for run in runs if regex.search(run.name)]


def diverged_at(records: list[dict]) -> int | None:
    return next((r["step"] for r in records if r.get("diverged")), None)


def progress(records: list[dict], steps: int) -> str:
    """Where a run stands from its metrics.jsonl: new, partial, done or diverged."""
    if not records:
        return "new"
    if diverged_at(records) is not None:
        return "diverged"
    return "done" if records[-1]["step"] >= steps else "partial"


def eval_curve(records: list[dict]) -> tuple[list[int], list[float]]:
    points = [(r["step"], r["eval/loss"]) for r in records if math.isfinite(r.get("eval/loss", math.nan))]
    return [s for s, _ in points], [loss for _, loss in points]


def summarize(run: Run, config: dict, records: list[dict]) -> dict:
    """One row of the report from a run's resolved config.json and metrics.jsonl records.

    Final losses are those of the last logged step, so a diverged run's are NaN: it has no
    final model. Its best eval loss is the best before it diverged."""
    n_params = flops.count_params(flops.param_shapes(GPTConfig(**config["model"])))
    diverged = diverged_at(records)
    evals = eval_curve(records)[1]
    speeds = [r["train/tokens_per_s"] for r in records if r.get("train/tokens_per_s", 0) > 0]
    return {
        "run": run.name,
        "overrides": " ".join(f"{key}={value}" for key, value in run.varied),
        "parameters": n_params,
        "last_step": records[-1]["step"],
        "train_steps": config["train"]["steps"],
        "final_train_loss": records[-1].get("train/loss", math.nan),
        "final_eval_loss": records[-1].get("eval/loss", math.nan),
        "best_eval_loss": min(evals, default=math.nan),
        "diverged_at_step": diverged,
        "tokens_per_s": statistics.median(speeds) if speeds else math.nan,
    }
