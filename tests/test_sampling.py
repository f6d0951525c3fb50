"""KV-cache decoding against the full forward pass, and the sampler's contract: greedy is
repeated argmax, padding changes nothing, seeds reproduce, filters keep the right tokens,
and the compiled loop is traced once."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt import sampling
from gpt.config import GPTConfig
from gpt.model import GPT, init_cache
from tests.helpers import max_relative_error

TINY = GPTConfig(vocab_size=97, max_len=32, n_layer=2, d_model=32, n_head=4, d_ff=64,
                 embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
PLACEMENTS = {"pre": TINY, "post": dataclasses.replace(TINY, norm_position="post", final_norm=False)}


# One batch of prompts of different lengths for every test, so they share compilations;
# the last one fills the context after 3 new tokens.
PROMPTS = [np.random.default_rng(n).integers(0, TINY.vocab_size, n).tolist()
           for n in (5, 2, TINY.max_len - 3)]
NEW = 8


def _params(cfg, seed=0):
    """Every parameter N(0, 0.3), gains and biases included: a random model whose greedy
    continuations are not all alike, drawn by NumPy (compiling JAX's RNG is slow on CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(GPT(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), shapes["params"])


@pytest.fixture(scope="module")
def pre():
    return GPT(TINY), _params(TINY)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_cached_logits_equal_full_forward(placement, ops):
    """Prefill a right-padded batch, then one token per call at each row's own positions."""
    cfg = PLACEMENTS[placement]
    model, params = GPT(cfg, ops), _params(cfg)
    seqs_BxT = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 14))
    lengths_B, steps = np.array([6, 3]), 8
    prompts_BxP = np.where(np.arange(6) < lengths_B[:, None], seqs_BxT[:, :6], 7)  # row 1 padded

    @jax.jit
    def cached_and_full(params):
        apply = functools.partial(model.apply, {"params": params})
        h_BxPxD, cache = apply(prompts_BxP, np.broadcast_to(np.arange(6), (2, 6)),
                               init_cache(cfg, 2, 14), method=GPT.decode)

        def step(cache, t):
            positions_B = lengths_B + t
            h_Bx1xD, cache = apply(jnp.asarray(seqs_BxT)[np.arange(2), positions_B][:, None],
                                   positions_B[:, None], cache, method=GPT.decode)
            return cache, h_Bx1xD[:, 0]

        _, h_SxBxD = jax.lax.scan(step, cache, jnp.arange(steps))
        return (apply(h_BxPxD, method=GPT.logits), apply(h_SxBxD, method=GPT.logits),
                apply(seqs_BxT))  # causal: row b's first n logits are those of its own tokens

    prefill, steps_SxBxV, full = cached_and_full(params)
    for b in range(2):
        cached = np.concatenate([prefill[b, :lengths_B[b]], steps_SxBxV[:, b]])
        assert max_relative_error(cached, full[b, :lengths_B[b] + steps]) < 1e-5, (placement, b)


def _argmax_continuation(model, params, prompt, n):
    """Greedy decoding the slow way, one prompt alone: a full forward pass per token."""
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, model.cfg.max_len), np.int32)  # one shape: causal, so padding is unseen
        padded[0, :len(seq)] = seq
        seq.append(int(np.argmax(forward(padded)[0, len(seq) - 1])))
    return seq[len(prompt):]


def _greedy(model, params, **kw):
    return sampling.generate(model, params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(0),
                             temperature=0, **kw)


def test_greedy_batch_is_each_prompts_repeated_argmax(pre, ops):
    model, params = GPT(TINY, ops), pre[1]
    tokens, lengths = _greedy(model, params)
    assert lengths.tolist() == [NEW, NEW, 3]  # the last prompt fills the context after 3
    expected = [_argmax_continuation(model, params, p, n) for p, n in zip(PROMPTS, lengths)]
    assert [row[:n].tolist() for row, n in zip(tokens, lengths)] == expected
    assert expected[0] != expected[1] and len(set(expected[0])) > 1  # not a degenerate model

    # End-of-text: a row stops at its first one, and keeps it; the others run on.
    eot = expected[0][3]
    first = expected[0].index(eot)
    tokens, lengths = _greedy(model, params, eot_id=eot)
    assert lengths[0] == first + 1 and tokens[0, :first + 1].tolist() == expected[0][:first + 1]
    assert not tokens[0, first + 1:].any()
    assert lengths.tolist() == [e.index(eot) + 1 if eot in e else len(e) for e in expected]


def test_seeded_sampling_top_k_1_and_streaming(pre):
    model, params = pre
    draw = lambda seed, **kw: sampling.generate(  # noqa: E731
        model, params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(seed), **kw)[0]
    a, again, other = draw(0), draw(0), draw(1)
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, other)
    np.testing.assert_array_equal(draw(5, top_k=1), _greedy(model, params)[0])
    chunks = list(sampling.stream(model, params, PROMPTS, max_new_tokens=NEW,
                                  rng=jax.random.key(0), chunk=3))
    assert [len(c[0]) for c in chunks] == [1, 3, 3, 1]  # prefill's token, then chunks of 3
    assert [len(c[2]) for c in chunks] == [1, 2, 0, 0]  # the long prompt stops at the context
    streamed = [np.concatenate(row) for row in zip(*chunks)]
    assert [s.tolist() for s in streamed] == [row[:len(s)].tolist() for row, s in zip(a, streamed)]


def _kept(probs, **kw):
    logits = jnp.log(jnp.asarray([probs], jnp.float32))
    return set(np.flatnonzero(np.isfinite(sampling.warp_logits(logits, temperature=1.0, **kw)[0])))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.05, 0.4, 0.1, 0.3, 0.15]  # sorted: 1 (.4), 3 (.3), 4 (.15), 2 (.1), 0 (.05)
    assert _kept(probs, top_p=0.39) == {1}
    assert _kept(probs, top_p=0.41) == {1, 3}
    assert _kept(probs, top_p=0.69) == {1, 3}
    assert _kept(probs, top_p=0.71) == {1, 3, 4}
    assert _kept(probs, top_p=0.9) == {1, 3, 4, 2}
    assert _kept(probs, top_p=1.0) == {0, 1, 2, 3, 4}
    assert _kept(probs, top_k=2) == {1, 3}
    assert _kept(probs, top_k=3, top_p=0.5) == {1, 3}  # top-p over top-k's renormalised 0.47, 0.35
    warped = sampling.warp_logits(jnp.log(jnp.asarray([probs])), temperature=2.0)
    np.testing.assert_allclose(warped[0], np.log(probs) / 2, rtol=1e-6)


class CountingGPT(GPT):
    traces = 0

    def decode(self, *args):
        CountingGPT.traces += 1  # a Python side effect: runs when traced, not when executed
        return super().decode(*args)


def test_generation_is_traced_once_per_shape():
    model, params = CountingGPT(TINY), _params(TINY)
    run = lambda seed, prompts, **kw: sampling.generate(  # noqa: E731
        model, params, prompts, max_new_tokens=12, rng=jax.random.key(seed), temperature=0, **kw)
    run(0, [[1, 2, 3], [4]])
    assert CountingGPT.traces == 2  # the prefill and the loop's body, not one per token
    run(1, [[5, 6], [7, 8, 9]], eot_id=3)  # other prompts of the same padded shape, other stop
    for _ in sampling.stream(model, params, [[5, 6, 7], [8, 9]], max_new_tokens=12,
                             rng=jax.random.key(2), temperature=0, chunk=2):
        pass
    assert CountingGPT.traces == 2


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([[1]], {"max_new_tokens": -1}, "max_new_tokens"),
    ([[1]], {"top_p": 0.0}, "top_p"),
    ([[1]], {"top_p": 1.5}, "top_p"),
    ([[1]], {"top_k": -2}, "top_k"),
    ([[1]], {"temperature": -1.0}, "temperature"),
    ([[1], []], {}, "lengths"),
    ([list(range(TINY.max_len))], {}, "no room"),
    ([[1, 97]], {}, "token ids"),
])
def test_bad_input_is_a_value_error(pre, prompts, kwargs, match):
    model, params = pre
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        sampling.generate(model, params, prompts, rng=jax.random.key(0), **kwargs)


def test_zero_new_tokens(pre):
    tokens, lengths = sampling.generate(*pre, [[1, 2], [3]], max_new_tokens=0, rng=jax.random.key(0))
    assert tokens.shape == (2, 0) and lengths.tolist() == [0, 0]
