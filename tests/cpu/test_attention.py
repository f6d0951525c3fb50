"""The fused CPU attention kernel against causal attention computed in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt import cpu
from gpt.config import GPTConfig
from gpt.cpu.attention import causal_self_attention
from gpt.model import GPT
from gpt.ops import REFERENCE
from tests.helpers import max_relative_error


def _float64_truth(qkv, dout, heads):
    """Causal attention's output and its gradient with respect to qkv, by the textbook."""
    x = np.asarray(qkv, np.float64)
    *batch, t, width = x.shape
    k_dim = width // 3 // heads
    q, k, v = (np.moveaxis(a.reshape(*batch, t, heads, k_dim), -2, -3) for a in np.split(x, 3, -1))
    scale = 1 / np.sqrt(k_dim)
    s = q @ np.swapaxes(k, -1, -2) * scale
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    do = np.moveaxis(np.asarray(dout, np.float64).reshape(*batch, t, heads, k_dim), -2, -3)
    dv = np.swapaxes(p, -1, -2) @ do
    dp = do @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq, dk = ds @ k * scale, np.swapaxes(ds, -1, -2) @ q * scale
    merge = lambda a: np.moveaxis(a, -3, -2).reshape(*batch, t, heads * k_dim)  # noqa: E731
    return merge(out), np.concatenate([merge(dq), merge(dk), merge(dv)], -1)


def _xla(qkv, heads):
    """The same in float32 by XLA's ops: the error the kernel is held to."""
    *batch, t, width = qkv.shape
    q, k, v = (a.reshape(*batch, t, heads, -1) for a in jnp.split(qkv, 3, -1))
    s = jnp.einsum("...qhk,...shk->...hqs", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    return jnp.einsum("...hqs,...shk->...qhk", jax.nn.softmax(s, -1), v).reshape(*batch, t, -1)


# Sequences within one tile of 64, exactly tiles, and with a partial last tile; every width.
@pytest.mark.parametrize("batch,t,heads,k_dim", [
    (2, 5, 3, 16), (1, 64, 2, 32), (2, 130, 2, 64), (1, 200, 1, 128), (3, 128, 2, 16)])
def test_output_and_gradient_match_float64(batch, t, heads, k_dim):
    k_qkv, k_dout = jax.random.split(jax.random.key(t))
    qkv = jax.random.normal(k_qkv, (batch, t, 3 * heads * k_dim)) * 2  # peaked softmaxes too
    dout = jax.random.normal(k_dout, (batch, t, heads * k_dim))
    out_truth, dqkv_truth = _float64_truth(qkv, dout, heads)
    errors = {}
    for name, fn in [("kernel", causal_self_attention), ("xla", _xla)]:
        out, vjp = jax.vjp(lambda x: fn(x, heads), qkv)  # noqa: B023
        errors[name] = (max_relative_error(out, out_truth), max_relative_error(vjp(dout)[0], dqkv_truth))
    assert errors["kernel"][0] < 3 * errors["xla"][0] + 1e-7, errors
    assert errors["kernel"][1] < 3 * errors["xla"][1] + 1e-7, errors


def test_under_vmap_and_jit():
    qkv = jax.random.normal(jax.random.key(1), (3, 2, 70, 3 * 2 * 16))
    dout = jax.random.normal(jax.random.key(2), (3, 2, 70, 2 * 16))

    def loss(x):
        return jax.vmap(lambda x: (causal_self_attention(x, 2) * dout[0]).sum())(x).sum()

    out_truth, dqkv_truth = _float64_truth(qkv, jnp.broadcast_to(dout[0], dout.shape), 2)
    grad = jax.jit(jax.grad(loss))(qkv)
    assert max_relative_error(grad, dqkv_truth) < 1e-6
    assert max_relative_error(jax.vmap(lambda x: causal_self_attention(x, 2))(qkv), out_truth) < 1e-6


def _model(ops=None, **overrides):
    fields = dict(vocab_size=97, max_len=80, n_layer=2, d_model=64, n_head=4, d_ff=128,
                  embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    return GPT(GPTConfig(**{**fields, **overrides}), cpu.ops() if ops is None else ops)


def test_the_model_matches_its_xla_attention():
    tokens = jax.random.randint(jax.random.key(0), (2, 80), 0, 97)
    params = _model().init(jax.random.key(1), tokens)["params"]

    def loss_and_grad(ops):
        model = _model(ops)
        fn = jax.jit(jax.value_and_grad(lambda p: model.apply(
            {"params": p}, tokens, tokens, method="next_token_nll").mean()))
        assert ("gpt_attention_fwd" in fn.lower(params).as_text()) == (ops is not REFERENCE)
        return fn(params)

    fused, xla = loss_and_grad(cpu.ops()), loss_and_grad(REFERENCE)
    np.testing.assert_allclose(fused[0], xla[0], rtol=1e-6)
    assert max_relative_error(fused[1], xla[1]) < 1e-5


@pytest.mark.parametrize("overrides,deterministic", [
    ({"attn_pdrop": 0.1}, False),  # attention dropout: the kernel has none
    ({"dtype": "bfloat16"}, True),  # float32 only
    ({"n_head": 8}, True)])  # head width 8
def test_the_model_keeps_xlas_attention_where_the_kernel_does_not_apply(overrides, deterministic):
    model = _model(**overrides)
    tokens = jnp.zeros((1, 80), jnp.int32)
    params = model.init(jax.random.key(1), tokens)["params"]
    hlo = jax.jit(lambda p: model.apply({"params": p}, tokens, deterministic=deterministic,
                                        rngs={"dropout": jax.random.key(0)})).lower(params).as_text()
    assert "gpt_attention" not in hlo


def test_empty_sequences_give_empty_outputs():
    out, vjp = jax.vjp(lambda x: causal_self_attention(x, 2), jnp.zeros((2, 0, 3 * 2 * 16)))
    assert out.shape == (2, 0, 32) and vjp(out)[0].shape == (2, 0, 96)


def test_decoding_matches_xlas_and_writes_the_cache_in_place():
    """One token per row at different positions (the rows' caches already hold other tokens)
    against the XLA path: the output, both caches, and the in-place write the HLO aliases."""
    from gpt.model import init_cache
    model = _model(n_head=8)  # head width 8: any width serves
    cfg = model.cfg
    tokens = jax.random.randint(jax.random.key(0), (3, 1), 0, 97)
    positions = jnp.array([[0], [7], [cfg.max_len - 1]])
    params = model.init(jax.random.key(1), tokens)["params"]
    cache = tuple(tuple(jax.random.normal(jax.random.key(i + 2 * j), c.shape) for i, c in enumerate(layer))
                  for j, layer in enumerate(init_cache(cfg, 3, cfg.max_len)))

    def decode(ops):
        model = _model(ops, n_head=8)
        fn = jax.jit(lambda p, c: model.apply({"params": p}, tokens, positions, c, method=GPT.decode))
        assert ("gpt_attention_decode" in fn.lower(params, cache).as_text()) == (ops is not REFERENCE)
        return fn(params, cache)

    fused = decode(cpu.ops())
    assert max_relative_error(fused, decode(REFERENCE)) < 1e-5
    new_k = fused[1][0][0]
    np.testing.assert_array_equal(np.delete(new_k[1], 7, axis=0), np.delete(cache[0][0][1], 7, axis=0))


def test_decoding_refuses_a_position_outside_the_cache():
    from gpt.cpu.attention import decode
    cache = (jnp.zeros((1, 4, 2, 16)), jnp.zeros((1, 4, 2, 16)))
    with pytest.raises(Exception, match="a position outside the cache"):
        jax.block_until_ready(decode(jnp.zeros((1, 1, 96)), cache, jnp.array([[4]]), 2))
