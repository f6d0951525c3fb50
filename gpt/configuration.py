"""Checks a run's config before anything is compiled, so a mistake costs one line, not a traceback."""
from __future__ import annotations

import math

from gpt.model import ConfigError, GPTConfig
from gpt.optim import SCHEDULES
from gpt.train_step import PARALLELISMS


def model_config(config) -> GPTConfig:
    try:
        return GPTConfig(**config.model.to_dict())
    except TypeError as e:  # a key GPTConfig does not have
        raise ConfigError("model", f"only GPTConfig fields ({e})", "") from e


def _positive_int(config, key):
    section, name = key.split(".")
    value = config[section][name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, "a positive integer", value)
    return value


# Real-valued keys: (what is allowed, whether a finite value is). A NaN or an infinity would
# otherwise compile and train, then stop as a divergence that names no key.
_NUMBERS = {
    "model.init_std": ("a finite number >= 0", lambda v: v >= 0),
    "optim.lr": ("a finite number >= 0", lambda v: v >= 0),
    "optim.end_lr": ("a finite number >= 0", lambda v: v >= 0),
    "optim.warmup_steps": ("a non-negative number", lambda v: v >= 0),
    "optim.b1": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "optim.b2": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "optim.eps": ("a finite number > 0", lambda v: v > 0),
    "optim.weight_decay": ("a finite number >= 0", lambda v: v >= 0),
    "optim.grad_clip": ("a finite number >= 0 (0: no clipping)", lambda v: v >= 0),
    "train.epochs": ("a finite number >= 0 (0: use train.steps)", lambda v: v >= 0),
}


def _check_numbers(config) -> None:
    for key, (allowed, ok) in _NUMBERS.items():
        section, name = key.split(".")
        value = config[section][name]
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not ok(value)):
            raise ConfigError(key, allowed, value)


def validate(config, num_devices: int = 1) -> GPTConfig:
    """Raises ConfigError naming the first bad key; returns the model's GPTConfig."""
    cfg = model_config(config)
    for key in ("data.batch_size", "data.seq_len", "train.steps", "train.log_every",
                "train.eval_every", "train.eval_steps", "train.ckpt_every", "train.keep_ckpts",
                "train.grad_accum_steps"):
        _positive_int(config, key)
    if config.data.seq_len > cfg.max_len:
        raise ConfigError("data.seq_len", f"at most model.max_len={cfg.max_len}", config.data.seq_len)
    if config.train.parallelism not in PARALLELISMS:
        raise ConfigError("train.parallelism", f"one of {', '.join(PARALLELISMS)}", config.train.parallelism)
    if config.optim.schedule not in SCHEDULES:
        raise ConfigError("optim.schedule", f"one of {', '.join(SCHEDULES)}", config.optim.schedule)
    _check_numbers(config)
    per_step = num_devices * config.train.grad_accum_steps
    if config.data.batch_size % per_step:
        raise ConfigError(
            "data.batch_size",
            f"a multiple of devices ({num_devices}) x train.grad_accum_steps "
            f"({config.train.grad_accum_steps}) = {per_step}", config.data.batch_size)
    return cfg


# Keys a resumed run may change: they alter neither the shapes of the saved state nor the
# data order. Everything else must match the checkpoint's config.
RESUME_SAFE = (
    "train.steps", "train.epochs", "train.log_every", "train.eval_every", "train.eval_steps",
    "train.ckpt_every", "train.keep_ckpts", "train.keep_best", "train.peak_flops",
    "train.parallelism", "train.mesh.data", "train.mesh.fsdp", "train.grad_accum_steps",
    "train.skip_nonfinite", "train.poison_step", "train.distributed", "train.num_processes",
    "train.process_id",
    "model.embd_pdrop", "model.resid_pdrop", "model.attn_pdrop", "model.remat", "model.attention",
    "model.attention_block",
    "data.data_dir", "data.prefetch",
    "optim.lr", "optim.end_lr", "optim.warmup_steps", "optim.schedule", "optim.b2",
    "optim.weight_decay",
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(saved: dict, current: dict) -> tuple[dict, dict]:
    """Splits the differences between a checkpoint's config and the current one into
    (unsafe, safe), each {key: (saved value, current value)}. Keys that exist on one side
    only were added to (or removed from) the code since the checkpoint: not a user's change."""
    old, new = _flatten(saved), _flatten(current)
    changed = {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}
    unsafe = {k: v for k, v in changed.items() if k not in RESUME_SAFE}
    return unsafe, {k: v for k, v in changed.items() if k in RESUME_SAFE}
