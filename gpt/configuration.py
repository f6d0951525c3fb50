"""Checks a run's config before anything is compiled, so a mistake costs one line, not a traceback."""
from __future__ import annotations

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
    if config.optim.warmup_steps < 0 or config.optim.lr < 0:
        raise ConfigError("optim.lr" if config.optim.lr < 0 else "optim.warmup_steps",
                          "a non-negative number", min(config.optim.lr, config.optim.warmup_steps))
    if config.train.epochs < 0:
        raise ConfigError("train.epochs", "a non-negative number (0: use train.steps)", config.train.epochs)
    per_step = num_devices * config.train.grad_accum_steps
    if config.data.batch_size % per_step:
        raise ConfigError(
            "data.batch_size",
            f"a multiple of devices ({num_devices}) x train.grad_accum_steps "
            f"({config.train.grad_accum_steps}) = {per_step}", config.data.batch_size)
    eval_batch_size = config.train.eval_batch_size
    per_device = config.data.batch_size // num_devices
    if (isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size < 0
            or (eval_batch_size and per_device % eval_batch_size)):
        raise ConfigError("train.eval_batch_size",
                          f"0 (the train step's micro-batch) or a divisor of data.batch_size / devices "
                          f"= {per_device}", eval_batch_size)
    return cfg


def eval_micro_batch(config, num_devices: int) -> int:
    """Rows per device that one pass of the eval step takes: train.eval_batch_size, or by
    default the train step's micro-batch, so that evaluation fits wherever training does."""
    return config.train.eval_batch_size or (
        config.data.batch_size // (num_devices * config.train.grad_accum_steps))


# Keys a resumed run may change: they alter neither the shapes of the saved state nor the
# data order. Everything else must match the checkpoint's config.
RESUME_SAFE = (
    "train.steps", "train.epochs", "train.log_every", "train.eval_every", "train.eval_steps",
    "train.eval_batch_size", "train.ckpt_every", "train.keep_ckpts", "train.keep_best", "train.peak_flops",
    "train.parallelism", "train.mesh.data", "train.mesh.fsdp", "train.grad_accum_steps",
    "train.skip_nonfinite", "train.poison_step", "train.distributed", "train.num_processes",
    "train.process_id",
    "model.embd_pdrop", "model.resid_pdrop", "model.attn_pdrop", "model.remat", "model.attention",
    "model.attention_block",
    "data.data_dir", "data.prefetch",
    "optim.lr", "optim.end_lr", "optim.warmup_steps", "optim.schedule",
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
