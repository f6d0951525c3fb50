"""gpt.convert against Hugging Face's PyTorch GPT-2 and GPT-1 ports.

Equal weights must give equal logits, loss, gradients and optimizer steps; conversion
must round-trip bit-exactly; wrong inputs must fail with a message naming the path.
"""
import copy
import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
from flax import traverse_util
from transformers import (GPT2Config, GPT2LMHeadModel, OpenAIGPTConfig,
                          OpenAIGPTLMHeadModel)

from gpt import convert
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.ops import REFERENCE

torch.set_default_dtype(torch.float32)

HF = {"gpt2": (GPT2Config, GPT2LMHeadModel), "openai-gpt": (OpenAIGPTConfig, OpenAIGPTLMHeadModel)}
LOGITS_RTOL, GRAD_RTOL, STEP_RTOL = 1e-5, 1e-4, 1e-6

# name: (model_type, HF config fields, extra special tokens, sequence length)
CASES = {
    "gpt2": ("gpt2", dict(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16), 0, 16),
    "gpt2-odd": ("gpt2", dict(n_layer=3, n_embd=48, n_head=3, vocab_size=1000, n_positions=32,
                              n_inner=80, activation_function="gelu", tie_word_embeddings=False),
                 0, 11),
    "gpt2-torch-tanh": ("gpt2", dict(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=8,
                                     activation_function="gelu_pytorch_tanh",
                                     layer_norm_epsilon=1e-3), 0, 8),
    "gpt1": ("openai-gpt", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=211, n_positions=16),
             0, 16),
    "gpt1-odd": ("openai-gpt", dict(n_layer=3, n_embd=64, n_head=4, vocab_size=1000,
                                    n_positions=32, tie_word_embeddings=False), 3, 9),
    "gpt1-relu": ("openai-gpt", dict(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=8,
                                     afn="relu"), 0, 5),
}


def _hf_model(model_type, fields, n_special=0):
    """A random HF model in eval mode with dropout off.

    HF's init leaves LayerNorms and biases at exactly 1 and 0, which would hide a swapped or
    dropped one, and gives openai-gpt's Conv1Ds std 0.02, under which GELU inputs stay
    where exact and tanh GELU agree to 1e-7. N(0, 0.3) weights push GELU inputs to |x| ~ 2
    and make attention far from uniform, so such mistakes show in the logits.
    """
    torch.manual_seed(0)
    config_cls, model_cls = HF[model_type]
    model = model_cls(config_cls(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **fields))
    if n_special:  # how GPT-1 fine-tuning adds its start/delimiter/extract tokens
        model.resize_token_embeddings(model.config.vocab_size + n_special)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


def _tokens(vocab_size, batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length), dtype=np.int32)


def _loss_and_logits(params, cfg, tokens_BxT, ops=REFERENCE):
    logits_BxTxV = GPT(cfg, ops).apply({"params": params}, tokens_BxT, deterministic=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV[:, :-1], tokens_BxT[:, 1:]).mean()
    return loss, logits_BxTxV


_forward = jax.jit(_loss_and_logits, static_argnums=(1, 3))


@functools.partial(jax.jit, static_argnums=(1, 3))
def _ours(params, cfg, tokens_BxT, ops=REFERENCE):
    """(mean next-token loss, logits, gradients of the loss): one compile per config and ops."""
    (loss, logits_BxTxV), grads = jax.value_and_grad(_loss_and_logits, has_aux=True)(
        params, cfg, tokens_BxT, ops)
    return loss, logits_BxTxV, grads


def _hf_loss_and_grads(model, tokens):
    model.zero_grad()
    ids = torch.from_numpy(tokens).long()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.item(), {name: p.grad.numpy() for name, p in model.named_parameters()}


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


def _assert_close(ours, ref, rtol, what):
    """Relative error in norm, so one wrong element of any size in a tensor still shows."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert err <= rtol, (f"{what}: relative error {err:.2e} > {rtol:.0e}; "
                         f"max abs error {np.abs(ours - ref).max():.2e}")


def _assert_trees_close(ours, ref, rtol, what):
    ref = traverse_util.flatten_dict(ref)
    for path, value in traverse_util.flatten_dict(ours).items():
        _assert_close(value, ref[path], rtol, f"{what} {'/'.join(path)}")


def _via_disk(model, path):
    model.save_pretrained(path)
    return convert.from_hf(path)


@dataclasses.dataclass
class Converted:
    hf: torch.nn.Module
    cfg: GPTConfig
    params: dict
    tokens: np.ndarray


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    model_type, fields, n_special, length = CASES[request.param]
    model = _hf_model(model_type, fields, n_special)
    cfg, params = _via_disk(model, tmp_path_factory.mktemp(request.param))
    return Converted(model, cfg, params, _tokens(cfg.vocab_size, 2, length))


def test_params_match_init_structure(case):
    init = jax.eval_shape(GPT(case.cfg).init, jax.random.key(0), case.tokens)["params"]
    assert jax.tree.structure(case.params) == jax.tree.structure(init)
    for ours, fresh in zip(jax.tree.leaves(case.params), jax.tree.leaves(init)):
        assert (ours.shape, ours.dtype) == (fresh.shape, fresh.dtype)
    assert case.cfg.vocab_size == case.hf.config.vocab_size  # GPT-1 special tokens carried


def test_logits_match_hf(case, ops):
    _, ours, _ = _ours(case.params, case.cfg, case.tokens, ops)
    _assert_close(ours, _hf_logits(case.hf, case.tokens), LOGITS_RTOL, "logits")


def test_loss_and_gradients_match_hf(case, ops):
    loss, _, grads = _ours(case.params, case.cfg, case.tokens, ops)
    hf_loss, hf_grads = _hf_loss_and_grads(case.hf, case.tokens)
    _assert_close(loss, hf_loss, LOGITS_RTOL, "loss")
    # Tied embeddings: both sides' wte gradient includes the head's contribution.
    _assert_trees_close(grads, convert.from_state_dict(case.cfg, hf_grads), GRAD_RTOL, "grad")


def test_the_optimizer_matches_torch_adamw(case, ops):
    """The project's optimizer (gpt.optim: warmup and cosine, global-norm clipping, decay on
    weights and embeddings only; the fused update under gpt/cpu's ops) against torch.optim.AdamW
    with decay / no-decay parameter groups, LambdaLR and clip_grad_norm_, over four steps.

    Both sides step on the same gradients (HF's, converted): they agree separately
    (test_loss_and_gradients_match_hf), and each side stepping on its own would turn every
    rounding-level gradient element into a coin flip, as Adam divides each by its own size.
    """
    import ml_collections

    from gpt.optim import make_optimizer
    o = ml_collections.ConfigDict(dict(lr=1e-3, end_lr=1e-4, warmup_steps=2, schedule="cosine",
                                       b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=0.5))
    total, n_steps = 6, 4
    model = copy.deepcopy(case.hf)
    _, hf_grads = _hf_loss_and_grads(model, case.tokens)
    named = dict(model.named_parameters())
    groups = [{"params": [p for p in named.values() if p.ndim >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in named.values() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)

    def warmup_cosine(step):  # the multiplier of lr, written from the schedule's definition
        if step < o.warmup_steps:
            return step / o.warmup_steps
        progress = (step - o.warmup_steps) / (total - o.warmup_steps)
        return (o.end_lr + (o.lr - o.end_lr) * 0.5 * (1 + np.cos(np.pi * progress))) / o.lr

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    for _ in range(n_steps):
        for name, p in named.items():
            p.grad = torch.from_numpy(hf_grads[name].copy())
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        schedule.step()

    tx, _ = make_optimizer(o, total, ops)
    grads = jax.tree_util.tree_map(jnp.asarray, convert.from_state_dict(case.cfg, hf_grads))

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = case.params, tx.init(case.params)
    for _ in range(n_steps):
        params, state = step(params, state)
    hf_stepped = convert.from_state_dict(case.cfg, {k: v.detach().numpy() for k, v in model.state_dict().items()})
    _assert_trees_close(params, hf_stepped, STEP_RTOL, f"after {n_steps} steps")


def test_hf_round_trip_is_bit_exact(case, tmp_path):
    convert.to_hf(case.cfg, case.params, tmp_path)
    reloaded = type(case.hf).from_pretrained(tmp_path)
    original, again = case.hf.state_dict(), reloaded.state_dict()
    assert original.keys() == again.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name


def test_gpt1_activation_is_tanh_gelu(tmp_path):
    """HF's openai-gpt afn 'gelu' is gelu_new, the tanh form GPT-1 used; exact GELU would show."""
    model = _hf_model("openai-gpt", CASES["gpt1"][1])
    cfg, params = _via_disk(model, tmp_path)
    assert cfg.activation == "gelu_tanh"
    tokens = _tokens(cfg.vocab_size, 2, 16)
    _, exact = _forward(params, dataclasses.replace(cfg, activation="gelu"), tokens)
    with pytest.raises(AssertionError, match="relative error"):
        _assert_close(exact, _hf_logits(model, tokens), LOGITS_RTOL, "logits with exact GELU")


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("tie", [True, False])
def test_to_hf_of_our_init_loads_cleanly_and_agrees(placement, tie, tmp_path):
    cfg = GPTConfig(vocab_size=101, max_len=16, n_layer=2, d_model=32, n_head=4, d_ff=128,
                    norm_position=placement, final_norm=placement == "pre", tie_embeddings=tie,
                    scale_residual_init=placement == "pre", embd_pdrop=0.0, resid_pdrop=0.0,
                    attn_pdrop=0.0)
    params = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    # Fresh LayerNorms and biases are exactly 1 and 0; noise keeps a swapped one from hiding.
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), params)
    convert.to_hf(cfg, params, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    model_cls = HF[config["model_type"]][1]
    assert config["architectures"] == [model_cls.__name__]
    assert model_cls is (GPT2LMHeadModel if placement == "pre" else OpenAIGPTLMHeadModel)
    model, info = model_cls.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not problems for problems in info.values()), info
    tokens = _tokens(cfg.vocab_size, 2, 12)
    _, ours = _forward(params, cfg, tokens)
    _assert_close(ours, _hf_logits(model.eval(), tokens), LOGITS_RTOL, "logits")
    assert convert.from_hf(tmp_path)[0] == cfg


def test_config_fields_map(tmp_path):
    GPT2LMHeadModel(GPT2Config(
        n_layer=3, n_embd=48, n_head=3, vocab_size=1000, n_positions=32, n_inner=80,
        activation_function="relu", resid_pdrop=0.11, embd_pdrop=0.12, attn_pdrop=0.13,
        layer_norm_epsilon=1e-6, initializer_range=0.03, tie_word_embeddings=False,
    )).save_pretrained(tmp_path)
    assert convert.from_hf(tmp_path)[0] == GPTConfig(
        vocab_size=1000, max_len=32, n_layer=3, d_model=48, n_head=3, d_ff=80,
        norm_position="pre", final_norm=True, resid_pdrop=0.11, embd_pdrop=0.12, attn_pdrop=0.13,
        layer_norm_eps=1e-6, activation="relu", tie_embeddings=False, init_std=0.03,
        scale_residual_init=True)


@pytest.mark.parametrize("model_type", list(HF))
def test_defaults_for_omitted_config_keys_are_hfs(model_type):
    hf_defaults = HF[model_type][0]().to_dict()
    arch = convert.ARCHITECTURES[model_type]
    assert {key: hf_defaults[key] for key in arch.defaults} == arch.defaults


def _hub_style(model, path, shard):
    """The released files' layout: base-model names, buffers older versions saved, legacy
    formats. The cases used here tie the head, so the base model holds every parameter."""
    state = {name.removeprefix("transformer."): tensor
             for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    n = model.config.n_positions
    state["position_ids"] = torch.arange(n)
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    path.mkdir()
    model.config.save_pretrained(path)
    if shard:  # a sharded safetensors checkpoint, as save_pretrained writes big models
        names = sorted(state)
        halves = {"model-00001-of-00002.safetensors": names[::2],
                  "model-00002-of-00002.safetensors": names[1::2]}
        for file, part in halves.items():
            safetensors.numpy.save_file({n: state[n].numpy() for n in part}, path / file)
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {n: file for file, part in halves.items() for n in part}}))
    else:
        torch.save(state, path / "pytorch_model.bin")


@pytest.mark.parametrize("model_type", list(HF))
@pytest.mark.parametrize("shard", [False, True])
def test_reads_released_layouts(model_type, shard, tmp_path):
    model = _hf_model(model_type, CASES["gpt1" if model_type == "openai-gpt" else "gpt2"][1])
    cfg, params = _via_disk(model, tmp_path / "plain")
    _hub_style(model, tmp_path / "hub", shard)
    hub_cfg, hub_params = convert.from_hf(tmp_path / "hub")
    assert hub_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, hub_params, params)


def _saved(tmp_path, model_type="gpt2", **fields):
    model = HF[model_type][1](HF[model_type][0](
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8, **fields))
    model.save_pretrained(tmp_path)
    return model


def test_rejects_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}.*'bert'.*gpt2, openai-gpt"):
        convert.from_hf(tmp_path)


def test_missing_files_name_path_and_allowed(tmp_path):
    path = re.escape(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{path}/config.json.*model.safetensors"):
        convert.from_hf(tmp_path)
    _saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{path}.*model.safetensors.*pytorch_model.bin"):
        convert.from_hf(tmp_path)


def test_tensor_checks(tmp_path):
    _saved(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = safetensors.numpy.load_file(weights)
    wte = state["transformer.wte.weight"]
    safetensors.numpy.save_file({**state, "lm_head.weight": wte}, weights)  # older saves tied too
    convert.from_hf(tmp_path)
    safetensors.numpy.save_file({**state, "lm_head.weight": wte + 1}, weights)
    with pytest.raises(ValueError, match=r"tie_word_embeddings is set but lm_head.weight !="):
        convert.from_hf(tmp_path)
    safetensors.numpy.save_file({**state, "transformer.h.0.attn.rotary": np.zeros(2)}, weights)
    with pytest.raises(ValueError, match=r"unexpected tensor 'transformer.h.0.attn.rotary'"):
        convert.from_hf(tmp_path)
    safetensors.numpy.save_file({**state, "transformer.wte.weight": np.zeros((51, 16))}, weights)
    with pytest.raises(ValueError, match=r"transformer.wte.weight has shape \(51, 16\)"):
        convert.from_hf(tmp_path)
    del state["transformer.ln_f.bias"]
    safetensors.numpy.save_file(state, weights)
    with pytest.raises(ValueError, match=r"missing tensors \['transformer.ln_f.bias'\]"):
        convert.from_hf(tmp_path)


@pytest.mark.parametrize("model_type, fields, match", [
    ("openai-gpt", dict(afn="silu"), r"afn='silu' is not supported; allowed: gelu, relu"),
    ("gpt2", dict(activation_function="quick_gelu"), r"activation_function='quick_gelu'"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), r"scale_attn_by_inverse_layer_idx"),
])
def test_rejects_what_our_model_cannot_express(model_type, fields, match, tmp_path):
    _saved(tmp_path, model_type, **fields)
    with pytest.raises(ValueError, match=match):
        convert.from_hf(tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(norm_position="pre", final_norm=False), r"no Hugging Face architecture"),
    (dict(norm_position="post", final_norm=True), r"no Hugging Face architecture"),
    (dict(norm_position="post", final_norm=False, activation="gelu"),
     r"model.activation='gelu' has no OpenAIGPTLMHeadModel equivalent"),
    (dict(norm_position="post", final_norm=False, d_ff=100), r"4 \* d_model = 128"),
])
def test_to_hf_refuses_what_hf_cannot_express(change, match, tmp_path):
    cfg = GPTConfig(vocab_size=50, max_len=8, n_layer=1, d_model=32, n_head=2, d_ff=128)
    params = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    cfg = dataclasses.replace(cfg, **change)
    with pytest.raises(ValueError, match=match):
        convert.to_hf(cfg, params, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["gpt2", "gpt1"])
def test_scanned_layout_both_ways(name, tmp_path):
    """HF -> a scan_layers model (h/block/... stacked) gives HF's logits; the scanned params
    go back to HF's state dict unchanged."""
    model_type, fields, _, length = CASES[name]
    model = _hf_model(model_type, fields)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = convert.from_hf(tmp_path / "hf", base=GPTConfig(scan_layers=True))
    assert cfg.scan_layers and params["h"]["block"]["ln_1"]["scale"].shape == (cfg.n_layer, cfg.d_model)
    tokens = _tokens(cfg.vocab_size, 2, length)
    _, ours = _forward(params, cfg, tokens)
    _assert_close(ours, _hf_logits(model, tokens), LOGITS_RTOL, "scanned logits")
    convert.to_hf(cfg, params, tmp_path / "out")
    again = type(model).from_pretrained(tmp_path / "out").state_dict()
    for hf_name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again[hf_name]), hf_name


def test_unreadable_inputs_name_the_file(tmp_path):
    _saved(tmp_path)
    config, weights = tmp_path / "config.json", tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}: not a readable safetensors"):
        convert.from_hf(tmp_path)
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{re.escape(str(config))}: expected a JSON object.*list"):
        convert.from_hf(tmp_path)
    config.write_text('{"model_type": ')
    with pytest.raises(ValueError, match=rf"{re.escape(str(config))}: not valid JSON"):
        convert.from_hf(tmp_path)
