"""Parameters to and from Hugging Face's GPT2LMHeadModel / OpenAIGPTLMHeadModel checkpoints.

HF's Conv1D weights are [in, out] like flax Dense kernels, so everything except the
untied head (an nn.Linear, [out, in]) is a rename. One table, `_TABLE`, names every
parameter in both worlds; reading and writing both walk it, so they cannot drift apart.
The library only needs numpy and safetensors; torch is imported solely to read the
legacy pickled `pytorch_model.bin` format.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

from gpt.config import GPTConfig
from gpt.model import GPT


@dataclasses.dataclass(frozen=True)
class _Arch:
    """What distinguishes one HF architecture: names, wiring, config keys and defaults."""

    model_type: str
    hf_class: str
    wte: str  # HF's module name for the token embedding
    wpe: str
    norm_position: str
    final_norm: bool
    scale_residual_init: bool  # how HF initialises it; informs our config, not the weights
    act_key: str  # config.json key holding the activation name
    activations: dict[str, str]  # HF name -> ours; to_hf writes the first HF name for each
    d_ff_key: str | None  # None: HF fixes the MLP width at 4 * n_embd
    required: dict[str, Any]  # config values our model assumes; anything else is refused
    defaults: dict[str, Any]  # HF's config-class defaults, for keys config.json may omit
    eos_token_id: int | None  # GPT-2's <|endoftext|>; written only when inside the vocabulary


_COMMON_DEFAULTS = dict(
    n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
    layer_norm_epsilon=1e-5, initializer_range=0.02, tie_word_embeddings=True)

GPT2 = _Arch(
    model_type="gpt2", hf_class="GPT2LMHeadModel", wte="wte", wpe="wpe",
    norm_position="pre", final_norm=True, scale_residual_init=True,
    act_key="activation_function",
    activations={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                 "relu": "relu"},
    d_ff_key="n_inner",
    required=dict(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                  add_cross_attention=False),
    defaults=dict(_COMMON_DEFAULTS, vocab_size=50257, n_positions=1024, n_inner=None,
                  activation_function="gelu_new", scale_attn_weights=True,
                  scale_attn_by_inverse_layer_idx=False, add_cross_attention=False),
    eos_token_id=50256,
)
# HF's OpenAIGPT maps afn "gelu" to gelu_new, the tanh approximation GPT-1 used.
OPENAI_GPT = _Arch(
    model_type="openai-gpt", hf_class="OpenAIGPTLMHeadModel", wte="tokens_embed",
    wpe="positions_embed", norm_position="post", final_norm=False, scale_residual_init=False,
    act_key="afn", activations={"gelu": "gelu_tanh", "relu": "relu"}, d_ff_key=None,
    required={}, defaults=dict(_COMMON_DEFAULTS, vocab_size=40478, n_positions=512, afn="gelu"),
    eos_token_id=None,
)
ARCHITECTURES = {arch.model_type: arch for arch in (GPT2, OPENAI_GPT)}

# (our parameter path, HF state-dict name, transpose). {i}: layer; {wte}/{wpe}: _Arch names.
# Rows whose parameter a config lacks (ln_f, lm_head) are skipped for that config.
_TABLE = (
    ("wte/embedding", "transformer.{wte}.weight", False),
    ("wpe/embedding", "transformer.{wpe}.weight", False),
    ("h_{i}/ln_1/scale", "transformer.h.{i}.ln_1.weight", False),
    ("h_{i}/ln_1/bias", "transformer.h.{i}.ln_1.bias", False),
    ("h_{i}/attn/c_attn/kernel", "transformer.h.{i}.attn.c_attn.weight", False),
    ("h_{i}/attn/c_attn/bias", "transformer.h.{i}.attn.c_attn.bias", False),
    ("h_{i}/attn/c_proj/kernel", "transformer.h.{i}.attn.c_proj.weight", False),
    ("h_{i}/attn/c_proj/bias", "transformer.h.{i}.attn.c_proj.bias", False),
    ("h_{i}/ln_2/scale", "transformer.h.{i}.ln_2.weight", False),
    ("h_{i}/ln_2/bias", "transformer.h.{i}.ln_2.bias", False),
    ("h_{i}/mlp/c_fc/kernel", "transformer.h.{i}.mlp.c_fc.weight", False),
    ("h_{i}/mlp/c_fc/bias", "transformer.h.{i}.mlp.c_fc.bias", False),
    ("h_{i}/mlp/c_proj/kernel", "transformer.h.{i}.mlp.c_proj.weight", False),
    ("h_{i}/mlp/c_proj/bias", "transformer.h.{i}.mlp.c_proj.bias", False),
    ("ln_f/scale", "transformer.ln_f.weight", False),
    ("ln_f/bias", "transformer.ln_f.bias", False),
    ("lm_head/kernel", "lm_head.weight", True),
)
# Non-parameter buffers older checkpoints carry: causal masks and position ids.
_BUFFERS = re.compile(r"transformer\.(h\.\d+\.attn\.(bias|masked_bias)|position_ids)")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")


def architecture(cfg: GPTConfig) -> _Arch:
    """The HF architecture with cfg's block wiring; only two placements exist there."""
    for arch in ARCHITECTURES.values():
        if (arch.norm_position, arch.final_norm) == (cfg.norm_position, cfg.final_norm):
            return arch
    raise ValueError(
        f"no Hugging Face architecture has model.norm_position={cfg.norm_position!r} with "
        f"model.final_norm={cfg.final_norm}: GPT2LMHeadModel is 'pre' with a final ln_f, "
        "OpenAIGPTLMHeadModel is 'post' without one")


@functools.lru_cache(maxsize=8)
def _mapping(cfg: GPTConfig) -> tuple[tuple[tuple[str, ...], str, bool, tuple[int, ...]], ...]:
    """_TABLE expanded for cfg: (our path, HF name, transpose, our shape) per parameter."""
    arch = architecture(cfg)
    abstract = jax.eval_shape(
        lambda: GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}
    rows = []
    for ours, hf, transpose in _TABLE:
        for i in range(cfg.n_layer) if "{i}" in ours else [None]:
            path = tuple(ours.format(i=i).split("/"))
            if path in shapes:
                name = hf.format(i=i, wte=arch.wte, wpe=arch.wpe)
                rows.append((path, name, transpose, shapes[path]))
    unmapped = set(shapes) - {row[0] for row in rows}
    if unmapped:
        raise ValueError(f"no Hugging Face name for parameters {sorted(unmapped)}")
    return tuple(rows)


def _canonical(name: str) -> str:
    """Base-model checkpoints (the released ones) lack the LM model's 'transformer.' prefix."""
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


def from_state_dict(cfg: GPTConfig, tensors: dict[str, Any], source: str = "state dict") -> dict:
    """HF-named tensors (a state dict, its gradients, ...) -> our float32 params tree."""
    rows = _mapping(cfg)
    tensors = {_canonical(name): value for name, value in tensors.items()}
    names = {hf for _, hf, _, _ in rows}
    for name in sorted(tensors.keys() - names):
        if name == "lm_head.weight" and cfg.tie_embeddings:
            wte = f"transformer.{architecture(cfg).wte}.weight"
            if wte in tensors and not np.array_equal(tensors[name], tensors[wte]):
                raise ValueError(f"{source}: tie_word_embeddings is set but {name} != {wte}")
        elif not _BUFFERS.fullmatch(name):
            raise ValueError(f"{source}: unexpected tensor {name!r}; expected only the parameters "
                             f"of a {cfg.n_layer}-layer {architecture(cfg).hf_class} and mask "
                             "buffers")
    missing = sorted(names - tensors.keys())
    if missing:
        raise ValueError(f"{source}: missing tensors {missing}")
    flat = {}
    for path, hf, transpose, shape in rows:
        value = np.asarray(tensors[hf], dtype=np.float32)
        value = value.T if transpose else value
        if value.shape != shape:
            raise ValueError(f"{source}: {hf} has shape {value.shape}, the config implies "
                             f"{shape} for {'/'.join(path)}")
        flat[path] = value
    return traverse_util.unflatten_dict(flat)


def to_state_dict(cfg: GPTConfig, params: dict) -> dict[str, np.ndarray]:
    """Our params tree -> HF-named float32 arrays (without the tied head, as HF saves it)."""
    rows, flat = _mapping(cfg), traverse_util.flatten_dict(params)
    expected = {path: shape for path, _, _, shape in rows}
    got = {path: tuple(np.shape(value)) for path, value in flat.items()}
    wrong = sorted("/".join(path) for path in expected.keys() | got.keys()
                   if expected.get(path) != got.get(path))
    if wrong:
        raise ValueError(f"params differ from GPT(cfg).init's structure or shapes at {wrong}")
    tensors = {}
    for path, hf, transpose, _ in rows:
        value = np.asarray(flat[path], dtype=np.float32)
        tensors[hf] = np.ascontiguousarray(value.T if transpose else value)
    return tensors


def _config_from_hf(hf: dict, source: str) -> GPTConfig:
    arch = ARCHITECTURES.get(hf.get("model_type"))
    if arch is None:
        raise ValueError(f"{source}: model_type={hf.get('model_type')!r} is not supported; "
                         f"allowed: {', '.join(ARCHITECTURES)}")
    hf = {**arch.defaults, **hf}
    for key, value in arch.required.items():
        if hf[key] != value:
            raise ValueError(f"{source}: {key}={hf[key]!r} is not supported; only {value!r}")
    activation = arch.activations.get(hf[arch.act_key])
    if activation is None:
        raise ValueError(f"{source}: {arch.act_key}={hf[arch.act_key]!r} is not supported; "
                         f"allowed: {', '.join(arch.activations)}")
    d_ff = hf[arch.d_ff_key] if arch.d_ff_key else None
    return GPTConfig(
        vocab_size=hf["vocab_size"], max_len=hf["n_positions"], n_layer=hf["n_layer"],
        d_model=hf["n_embd"], n_head=hf["n_head"], d_ff=d_ff or 4 * hf["n_embd"],
        norm_position=arch.norm_position, final_norm=arch.final_norm,
        embd_pdrop=hf["embd_pdrop"], resid_pdrop=hf["resid_pdrop"], attn_pdrop=hf["attn_pdrop"],
        layer_norm_eps=hf["layer_norm_epsilon"], activation=activation,
        tie_embeddings=hf["tie_word_embeddings"], init_std=hf["initializer_range"],
        scale_residual_init=arch.scale_residual_init)


def _config_to_hf(cfg: GPTConfig) -> dict:
    arch = architecture(cfg)
    act = next((hf for hf, ours in arch.activations.items() if ours == cfg.activation), None)
    if act is None:
        raise ValueError(f"model.activation={cfg.activation!r} has no {arch.hf_class} equivalent; "
                         f"allowed: {', '.join(sorted(set(arch.activations.values())))}")
    if arch.d_ff_key is None and cfg.d_ff != 4 * cfg.d_model:
        raise ValueError(f"{arch.hf_class} fixes the MLP width at 4 * d_model = "
                         f"{4 * cfg.d_model}; model.d_ff={cfg.d_ff}")
    eos = arch.eos_token_id
    if eos is not None and eos >= cfg.vocab_size:
        eos = None  # a smaller vocabulary has no <|endoftext|> there
    config = dict(
        architectures=[arch.hf_class], model_type=arch.model_type, vocab_size=cfg.vocab_size,
        n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
        resid_pdrop=cfg.resid_pdrop, embd_pdrop=cfg.embd_pdrop, attn_pdrop=cfg.attn_pdrop,
        layer_norm_epsilon=cfg.layer_norm_eps, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eos, eos_token_id=eos,
        dtype="float32", **{arch.act_key: act})
    if arch.d_ff_key:
        config[arch.d_ff_key] = cfg.d_ff
    return config


def _read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    file = next((path / name for name in _WEIGHT_FILES if (path / name).is_file()), None)
    if file is None:
        raise FileNotFoundError(
            f"{path}: no weights file; expected one of {', '.join(_WEIGHT_FILES)}")
    shards = [file]
    if file.name.endswith(".index.json"):  # a sharded checkpoint: the index names the shards
        shards = [path / shard
                  for shard in sorted(set(json.loads(file.read_text())["weight_map"].values()))]
    tensors = {}
    for shard in shards:
        if shard.name.endswith(".safetensors"):
            tensors.update(safetensors.numpy.load_file(shard))
        else:
            import torch  # only the legacy pickle format needs it
            state = torch.load(shard, map_location="cpu", weights_only=True)
            tensors.update({name: value.float().numpy() for name, value in state.items()})
    return tensors


def from_hf(path) -> tuple[GPTConfig, dict]:
    """Read a `save_pretrained` directory of GPT-2 or GPT-1 (openai-gpt) into (config, params)."""
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a Hugging Face checkpoint "
                                f"directory with config.json and one of {', '.join(_WEIGHT_FILES)}")
    cfg = _config_from_hf(json.loads(config_file.read_text()), str(config_file))
    return cfg, from_state_dict(cfg, _read_tensors(path), str(path))


def to_hf(cfg: GPTConfig, params: dict, path) -> None:
    """Write config.json + model.safetensors that HF's from_pretrained loads without warnings.

    Everything is validated before the first byte is written, so a refused config leaves no
    partial checkpoint. Init-only choices (scale_residual_init) don't constrain the target.
    """
    hf_config, tensors = _config_to_hf(cfg), to_state_dict(cfg, params)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
