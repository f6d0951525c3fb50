"""The model against the papers: exact sizes, causality, and each block placement
against a NumPy transcription of the paper's equations."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gpt1, gpt2
from gpt.config import model_config
from gpt.flops import count_params, param_shapes
from gpt.config import ConfigError, GPTConfig
from gpt.model import GPT, Block

TINY = GPTConfig(vocab_size=97, max_len=16, n_layer=2, d_model=32, n_head=4, d_ff=64,
                 embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)


@pytest.mark.parametrize("config, expected", [
    (gpt1.get_config(""), 116_534_784),
    (gpt2.get_config("small"), 124_439_808),
    (gpt2.get_config("medium"), 354_823_168),
    (gpt2.get_config("large"), 774_030_080),
    (gpt2.get_config("xl"), 1_557_611_200),
])
def test_paper_parameter_counts(config, expected):
    assert count_params(param_shapes(model_config(config))) == expected


def test_paper_architectures():
    g1, xl = model_config(gpt1.get_config("")), model_config(gpt2.get_config("xl"))
    assert (g1.norm_position, g1.final_norm, g1.vocab_size, g1.max_len) == ("post", False, 40478, 512)
    assert (xl.norm_position, xl.final_norm, xl.n_head, xl.max_len) == ("pre", True, 25, 1024)
    assert "ln_f" not in param_shapes(g1) and "ln_f" in param_shapes(xl)
    assert g1.activation == xl.activation == "gelu_tanh"


def _init(cfg, T=8, seed=0):
    return GPT(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, T), jnp.int32))["params"]


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_causal(norm_position):
    cfg = dataclasses.replace(TINY, norm_position=norm_position, final_norm=norm_position == "pre")
    params = _init(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
    apply = jax.jit(GPT(cfg).apply)
    logits = apply({"params": params}, tokens)
    for t in (0, 5, 11):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
        new = apply({"params": params}, changed)
        np.testing.assert_array_equal(logits[:, :t], new[:, :t])
        assert not np.allclose(logits[:, t:], new[:, t:])


def test_init_statistics():
    cfg = dataclasses.replace(TINY, d_model=256, n_head=4, d_ff=1024, n_layer=8, vocab_size=1000)
    p = _init(cfg)
    np.testing.assert_allclose(np.std(p["wte"]["embedding"]), 0.02, rtol=0.05)
    np.testing.assert_allclose(np.std(p["h_0"]["attn"]["c_attn"]["kernel"]), 0.02, rtol=0.05)
    for proj in (p["h_0"]["attn"]["c_proj"], p["h_3"]["mlp"]["c_proj"]):  # GPT-2's 1/sqrt(2L)
        np.testing.assert_allclose(np.std(proj["kernel"]), 0.02 / math.sqrt(16), rtol=0.05)
    unscaled = _init(dataclasses.replace(cfg, scale_residual_init=False))
    np.testing.assert_allclose(np.std(unscaled["h_0"]["mlp"]["c_proj"]["kernel"]), 0.02, rtol=0.05)
    assert not np.any(p["h_0"]["mlp"]["c_fc"]["bias"])
    np.testing.assert_array_equal(p["h_0"]["ln_1"]["scale"], 1.0)


# ---- NumPy transcription of the papers' equations ----------------------------------------

def np_layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_attention(x, p, n_head):
    B, T, D = x.shape
    qkv = x @ p["c_attn"]["kernel"] + p["c_attn"]["bias"]
    q, k, v = (a.reshape(B, T, n_head, D // n_head).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
    w = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D // n_head)
    w = np.where(np.tril(np.ones((T, T), bool)), w, -np.inf)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = (w @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
    return out @ p["c_proj"]["kernel"] + p["c_proj"]["bias"]


def np_mlp(x, p):
    return np_gelu_tanh(x @ p["c_fc"]["kernel"] + p["c_fc"]["bias"]) @ p["c_proj"]["kernel"] + p["c_proj"]["bias"]


def np_block(x, p, cfg):
    ln = lambda y, name: np_layer_norm(y, p[name], cfg.layer_norm_eps)  # noqa: E731
    if cfg.norm_position == "post":  # GPT-1: h = LN(x + attn(x)); out = LN(h + mlp(h))
        h = ln(x + np_attention(x, p["attn"], cfg.n_head), "ln_1")
        return ln(h + np_mlp(h, p["mlp"]), "ln_2")
    h = x + np_attention(ln(x, "ln_1"), p["attn"], cfg.n_head)  # GPT-2: x + f(LN(x))
    return h + np_mlp(ln(h, "ln_2"), p["mlp"])


def np_gpt(tokens, p, cfg):
    x = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][: tokens.shape[1]]
    for i in range(cfg.n_layer):
        x = np_block(x, p[f"h_{i}"], cfg)
    if cfg.final_norm:
        x = np_layer_norm(x, p["ln_f"], cfg.layer_norm_eps)
    return x @ p["wte"]["embedding"].T


def _perturbed(params, seed=3):
    """Non-trivial LayerNorm gains and biases, so a swapped or shared LayerNorm shows."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        np.asarray(x + 0.1 * jax.random.normal(k, x.shape), np.float64) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_block_matches_numpy_reference(norm_position):
    cfg = dataclasses.replace(TINY, norm_position=norm_position)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 7, cfg.d_model)))
    params = Block(cfg).init(jax.random.PRNGKey(1), x, True)["params"]
    params = _perturbed(params)
    ours = Block(cfg).apply({"params": jax.tree_util.tree_map(jnp.float32, params)}, x, True)
    np.testing.assert_allclose(ours, np_block(x.astype(np.float64), params, cfg), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm_position, final_norm", [("pre", True), ("post", False)])
def test_gpt_matches_numpy_reference(norm_position, final_norm, ops):
    cfg = dataclasses.replace(TINY, norm_position=norm_position, final_norm=final_norm)
    params = _perturbed(_init(cfg))
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, cfg.vocab_size))
    ours = GPT(cfg, ops).apply({"params": jax.tree_util.tree_map(jnp.float32, params)}, tokens)
    np.testing.assert_allclose(ours, np_gpt(tokens, params, cfg), rtol=1e-4, atol=1e-4)


def test_untied_head_and_dtype():
    cfg = dataclasses.replace(TINY, tie_embeddings=False, dtype="bfloat16")
    params = _init(cfg)
    assert params["lm_head"]["kernel"].shape == (cfg.d_model, cfg.vocab_size)
    assert params["wte"]["embedding"].dtype == jnp.float32  # parameters stay float32
    assert GPT(cfg).apply({"params": params}, jnp.zeros((1, 4), jnp.int32)).dtype == jnp.float32


@pytest.mark.parametrize("field, value, key", [
    ("norm_position", "middle", "model.norm_position"),
    ("n_head", 7, "model.n_head"),
    ("activation", "swish", "model.activation"),
    ("attn_pdrop", 1.5, "model.attn_pdrop"),
    ("n_layer", 0, "model.n_layer"),
    ("attention_block", -1, "model.attention_block"),
])
def test_bad_config_names_the_key(field, value, key):
    with pytest.raises(ConfigError, match=key):
        dataclasses.replace(TINY, **{field: value})


def _stacked(params, n_layer):
    """The unrolled h_0..h_{L-1} parameters in scan_layers' layout (h/block with a layer axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    blocks = [params[f"h_{i}"] for i in range(n_layer)]
    out["h"] = {"block": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)}
    return out


_REFERENCE = {}


def _loss_and_grads(cfg, params, tokens):
    loss = lambda p: jnp.mean(jax.nn.log_softmax(GPT(cfg).apply({"params": p}, tokens))[..., 0])  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("norm_position, variant", [
    ("pre", dict(scan_layers=True)), ("pre", dict(remat="full")), ("pre", dict(remat="dots")),
    ("post", dict(scan_layers=True, remat="full")),
    ("pre", dict(attention_block=4)), ("post", dict(attention_block=3, scan_layers=True)),
])
def test_layouts_compute_the_same(norm_position, variant):
    """Scanned vs unrolled blocks, rematerialised vs not, causal query blocks vs one block:
    the same loss and gradients (1e-5)."""
    cfg = dataclasses.replace(TINY, n_layer=3, norm_position=norm_position, final_norm=norm_position == "pre")
    other = dataclasses.replace(cfg, **variant)
    params = _init(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
    if norm_position not in _REFERENCE:
        _REFERENCE[norm_position] = _loss_and_grads(cfg, params, tokens)
    loss, grads = _REFERENCE[norm_position]
    other_params = _stacked(params, cfg.n_layer) if other.scan_layers else params
    assert jax.tree_util.tree_structure(other_params) == jax.tree_util.tree_structure(_init(other))
    other_loss, other_grads = _loss_and_grads(other, other_params, tokens)
    np.testing.assert_allclose(other_loss, loss, rtol=1e-5)
    if other.scan_layers:
        grads = _stacked(grads, cfg.n_layer)
    for a, b in zip(jax.tree_util.tree_leaves(other_grads), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_scanned_cache_decoding_matches_full_forward():
    from gpt.model import init_cache

    cfg = dataclasses.replace(TINY, n_layer=3, scan_layers=True)
    params = _init(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, cfg.vocab_size)
    full = GPT(cfg).apply({"params": params}, tokens)
    cache = init_cache(cfg, 2, cfg.max_len)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    h, cache = GPT(cfg).apply({"params": params}, tokens[:, :6], positions, cache, method=GPT.decode)
    steps = [GPT(cfg).apply({"params": params}, h, method=GPT.logits)]
    for t in range(6, 10):
        h, cache = GPT(cfg).apply({"params": params}, tokens[:, t:t + 1], jnp.full((2, 1), t), cache,
                                  method=GPT.decode)
        steps.append(GPT(cfg).apply({"params": params}, h, method=GPT.logits))
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_memory_estimate_scales_with_sharding_and_remat():
    from gpt.flops import memory_per_device

    cfg = model_config(gpt2.get_config("xl"))
    n = count_params(param_shapes(cfg))
    one, eight = memory_per_device(cfg, n, 1, 1024, fsdp=1), memory_per_device(cfg, n, 1, 1024, fsdp=8)
    assert one["parameters"] == 4 * n and eight["adam moments"] == 8 * n / 8
    full = memory_per_device(dataclasses.replace(cfg, remat="full"), n, 1, 1024)
    dots = memory_per_device(dataclasses.replace(cfg, remat="dots"), n, 1, 1024)
    assert full["activations"] < dots["activations"] < one["activations"]
