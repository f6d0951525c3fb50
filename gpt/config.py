"""The ground floor: a run's configuration, its validation and ConfigError.

A config is checked before anything is compiled, so a mistake costs one line, not a traceback.
Nothing here imports the model, the data or the training code: they all import this.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

SCHEDULES = ("cosine", "linear", "constant", "warmup_linear")
PARALLELISMS = ("jit", "pmap", "mesh")
BPE_BASE_SYMBOLS = 478  # GPT-1's learned BPE: base symbols before its merges (gpt/data/tokenizers.py)
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu")  # gelu_tanh: both papers' GELU
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")  # what the backward pass keeps: everything | each
# block's input | matmul outputs
ATTENTIONS = ("auto", "xla", "cudnn", "splash")  # see gpt/ops.py
CPU_KERNELS = ("attention", "matmul", "cross_entropy", "adamw")  # gpt/cpu's, for train.kernels


class ConfigError(ValueError):
    """A configuration value outside what is allowed; the message names the key."""

    def __init__(self, key: str, allowed: str, got: Any):
        super().__init__(f"{key}={got!r} is not allowed: {allowed}")
        self.key = key


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Architecture of one model; defaults are GPT-2 small."""

    vocab_size: int = 50257
    max_len: int = 1024
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    d_ff: int = 3072
    norm_position: str = "pre"  # "post": GPT-1's LN(x + f(x)); "pre": GPT-2's x + f(LN(x))
    final_norm: bool = True  # GPT-2's ln_f after the last block
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    tie_embeddings: bool = True
    init_std: float = 0.02
    wpe_init_std: float = 0.02  # position table; GPT-2's released code: 0.01 (HF: 0.02)
    scale_residual_init: bool = True  # GPT-2: residual projections get std / sqrt(2 * n_layer)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots: trade recomputation for activation memory
    scan_layers: bool = False  # nn.scan over the blocks: compile time independent of depth
    attention: str = "auto"  # auto | xla | cudnn | splash (gpt/ops.py)
    attention_block: int = 128  # xla, causal: queries in blocks of this many; 0 = one block

    def __post_init__(self):
        for key in ("vocab_size", "max_len", "n_layer", "d_model", "n_head", "d_ff"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key}", "a positive integer", value)
        if self.norm_position not in NORM_POSITIONS:
            raise ConfigError("model.norm_position", "one of pre, post", self.norm_position)
        if self.d_model % self.n_head:
            raise ConfigError(
                "model.n_head", f"must divide model.d_model={self.d_model}", self.n_head)
        if self.activation not in ACTIVATIONS:
            raise ConfigError("model.activation", f"one of {', '.join(ACTIVATIONS)}", self.activation)
        for key in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}", "a probability in [0, 1)", getattr(self, key))
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"model.{key}", f"one of {', '.join(DTYPES)}", getattr(self, key))
        if not self.layer_norm_eps > 0:
            raise ConfigError("model.layer_norm_eps", "a positive number", self.layer_norm_eps)
        if self.remat not in REMAT_POLICIES:
            raise ConfigError("model.remat", f"one of {', '.join(REMAT_POLICIES)}", self.remat)
        if not isinstance(self.attention_block, int) or self.attention_block < 0:
            raise ConfigError("model.attention_block", "a non-negative integer", self.attention_block)
        if self.attention not in ATTENTIONS:
            raise ConfigError("model.attention", f"one of {', '.join(ATTENTIONS)}", self.attention)
        if self.attention in ("cudnn", "splash") and self.attn_pdrop > 0:
            raise ConfigError("model.attention", "auto or xla when model.attn_pdrop > 0 (the fused "
                              "kernels have no attention dropout)", self.attention)
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ConfigError("model.attention", "auto or xla when model.dtype=float32 (cuDNN's "
                              "fused attention runs float16 and bfloat16)", self.attention)
        for key in ("init_std", "wpe_init_std"):
            if not 0 < getattr(self, key) < math.inf:
                raise ConfigError(f"model.{key}", "a positive finite number", getattr(self, key))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def residual_init_std(self) -> float:
        if self.scale_residual_init:
            return self.init_std / math.sqrt(2 * self.n_layer)
        return self.init_std



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


def cpu_kernels(value: str) -> tuple[str, ...]:
    """train.kernels -> the CPU kernels it allows: "auto" all, "none" none, "a,b" those, "-a,b"
    all but those (A/B comparisons of one kernel)."""
    names = value.removeprefix("-").split(",") if isinstance(value, str) else [None]
    if value in ("auto", "none"):
        return CPU_KERNELS if value == "auto" else ()
    if not set(names) <= set(CPU_KERNELS):
        raise ConfigError("train.kernels", f"auto, none, or a comma-separated subset of "
                          f"{', '.join(CPU_KERNELS)} (with a leading - : all but those)", value)
    return tuple(k for k in CPU_KERNELS if (k in names) != value.startswith("-"))


def validate(config, num_devices: int = 1) -> GPTConfig:
    """Raises ConfigError naming the first bad key; returns the model's GPTConfig."""
    cfg = model_config(config)
    for key in ("data.batch_size", "data.seq_len", "train.steps", "train.log_every",
                "train.eval_every", "train.eval_steps", "train.ckpt_every", "train.keep_ckpts",
                "train.grad_accum_steps"):
        _positive_int(config, key)
    if config.data.seq_len > cfg.max_len:
        raise ConfigError("data.seq_len", f"at most model.max_len={cfg.max_len}", config.data.seq_len)
    cpu_kernels(config.train.kernels)
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
    "train.wandb",
    "train.parallelism", "train.mesh.data", "train.mesh.fsdp", "train.grad_accum_steps",
    "train.skip_nonfinite", "train.poison_step", "train.distributed", "train.num_processes",
    "train.process_id", "train.kernels",
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
