"""Every step lowered, from this CPU host with abstract shapes, for the accelerators the users
train on: with gpt/cpu's kernels in the bundle (train.kernels=auto), nothing CPU-only may reach
a step lowered for cuda or tpu, and on tpu the attention is Pallas' splash kernel."""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from gpt import cpu, evaluation, sampling
from gpt.config import GPTConfig
from gpt.finetune.model import GPTClassifier, make_evaluate, make_loss
from gpt.model import GPT
from gpt.optim import make_optimizer
from gpt.parallel import make_steps
from gpt.train_step import create_state
from tests.helpers import tiny_config

KERNELS = cpu.ops()
PLATFORMS = ("cuda", "tpu")
# head width 64 and seq 128: the width and length the TPU kernel tiles
CFG = GPTConfig(vocab_size=128, max_len=128, n_layer=2, d_model=128, n_head=2, d_ff=256,
                embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
T = 128


def _custom_calls(text: str) -> set[str]:
    return set(re.findall(r'custom_call_target\s*=\s*"([^"]+)"', text)) | set(
        re.findall(r"stablehlo\.custom_call @(\w+)", text))


def _check(traced, platform):
    """Lowered for `platform`: no CPU kernel; returns the custom calls it has."""
    calls = _custom_calls(traced.lower(lowering_platforms=(platform,)).as_text())
    assert not {c for c in calls if c.startswith("gpt_")}, calls
    return calls


def _train_traced(cfg, batch_size=2, accum=1):
    config = tiny_config()
    model = GPT(cfg, KERNELS)
    tx, schedule = make_optimizer(config.optim, 10, KERNELS)
    state = jax.eval_shape(lambda: create_state(model, tx, 0, T))
    batch = {k: jax.ShapeDtypeStruct((batch_size, T), jnp.int32) for k in ("inputs", "targets")}
    steps = make_steps(model, schedule, "jit", accum)
    return steps.train.trace(state, batch), steps.eval.trace(state, batch)


VARIANTS = {
    "float32": {}, "bfloat16": {"dtype": "bfloat16"}, "scan": {"scan_layers": True},
    "remat": {"remat": "full"}, "xla attention": {"attention": "xla"},
    "attention dropout": {"attn_pdrop": 0.1, "resid_pdrop": 0.1},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_and_eval_steps(variant):
    cfg = dataclasses.replace(CFG, **VARIANTS[variant])
    train, evaluate = _train_traced(cfg)
    assert "gpt_attention_fwd" in _custom_calls(train.lower().as_text()) or \
        variant in ("bfloat16", "attention dropout")  # the kernel is float32, without dropout
    for platform in PLATFORMS:
        calls = _check(train, platform)
        _check(evaluate, platform)
        splash = variant in ("float32", "bfloat16", "scan", "remat")  # auto, no dropout
        assert ("tpu_custom_call" in calls) == (platform == "tpu" and splash), (platform, calls)


def test_gradient_accumulation():
    train, _ = _train_traced(CFG, batch_size=4, accum=2)
    for platform in PLATFORMS:
        _check(train, platform)


def test_sampling_prefill_and_decode_loop():
    model = GPT(CFG, KERNELS)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    s = sampling.Settings(max_new_tokens=4, cache_len=16, temperature=1.0, top_k=0, top_p=1.0)
    prompts = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    prefill = sampling._prefill.trace(model, s, params, prompts, lengths, jnp.int32(-1), rng)
    state = jax.eval_shape(functools.partial(sampling._prefill, model, s), params, prompts, lengths,
                           jnp.int32(-1), rng)
    decode = sampling._decode_until.trace(model, s, params, state, jnp.int32(4))
    assert "gpt_attention_decode" in _custom_calls(decode.lower().as_text())
    for platform in PLATFORMS:
        _check(prefill, platform)
        _check(decode, platform)


def test_scorer():
    model = GPT(CFG, KERNELS)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    tokens = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    traced = evaluation._token_scores.trace(model, params, tokens, tokens, None)
    for platform in PLATFORMS:
        _check(traced, platform)


@pytest.mark.parametrize("lm_coef", [0.0, 0.5])
def test_finetuning_steps(lm_coef):
    model = GPTClassifier(CFG, num_outputs=2, num_sequences=2, multiple_choice=True, ops=KERNELS)
    tx, schedule = make_optimizer(tiny_config().optim, 10, KERNELS)
    state = jax.eval_shape(lambda: create_state(model, tx, 0, 32))
    batch = {"tokens": jax.ShapeDtypeStruct((2, 2, 32), jnp.int32),
             "extract": jax.ShapeDtypeStruct((2, 2), jnp.int32),
             "lengths": jax.ShapeDtypeStruct((2, 2), jnp.int32),
             "label": jax.ShapeDtypeStruct((2,), jnp.int32),
             "weight": jax.ShapeDtypeStruct((2,), jnp.float32)}
    steps = make_steps(model, schedule, "jit", loss=make_loss(lm_coef, False, model.ops.nll),
                       evaluate=make_evaluate(False))
    for platform in PLATFORMS:
        _check(steps.train.trace(state, batch), platform)
        _check(steps.eval.trace(state, batch), platform)

