"""Autoregressive sampling with a KV cache: prefill the prompts, then one token per step
inside a compiled `lax.while_loop`, never recompiling per token.

Prompts of different lengths are right-padded. Row b's prompt fills cache slots
0..n_b-1 and its token at position p always lives in slot p, so every row decodes
at its true positions and attention masks by position alone (`GPT.decode`): the
padding slots of a short row are overwritten by its own new tokens before any of
its queries can see them. A row stops at end-of-text (which it keeps), after
`max_new_tokens`, or when prompt plus new tokens fill the model's context.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gpt.model import GPT, init_cache


class Settings(NamedTuple):
    """Static for compilation: one compiled prefill and loop per distinct setting."""

    max_new_tokens: int
    cache_len: int
    temperature: float
    top_k: int
    top_p: float


@flax.struct.dataclass
class State:
    cache: tuple
    tokens_BxN: jax.Array  # new tokens; row b's are tokens_BxN[b, :count_B[b]]
    count_B: jax.Array
    done_B: jax.Array
    lengths_B: jax.Array  # prompt lengths
    eot_id: jax.Array  # -1: none; traced, so changing it does not recompile
    step: jax.Array  # tokens sampled by a row that is still running
    rng: jax.Array


def warp_logits(logits_BxV, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Logits / temperature, then -inf outside the top k (ties at the k-th value stay) and
    outside the smallest set of most likely tokens whose probability reaches top_p; in that
    order, as Hugging Face's warpers. top_k=0 and top_p=1 switch each filter off."""
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p < 1.0:
        order_BxV = jnp.argsort(-logits_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(jnp.take_along_axis(logits_BxV, order_BxV, axis=-1), axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        keep_sorted_BxV = mass_before_BxV < top_p  # the first token is always kept
        rows_Bx1 = jnp.arange(logits_BxV.shape[0])[:, None]
        keep_BxV = jnp.zeros_like(keep_sorted_BxV).at[rows_Bx1, order_BxV].set(keep_sorted_BxV)
        logits_BxV = jnp.where(keep_BxV, logits_BxV, -jnp.inf)
    return logits_BxV


def _next_token(logits_BxV, key, s: Settings):
    if s.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    warped = warp_logits(logits_BxV, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    return jax.random.categorical(key, warped, axis=-1).astype(jnp.int32)


def _logits_at(module: GPT, tokens_BxT, positions_BxT, cache, last_B):
    """Decodes and returns the logits at each row's index `last_B` only (the head is wide)."""
    h_BxTxD, cache = module.decode(tokens_BxT, positions_BxT, cache)
    h_BxD = h_BxTxD[jnp.arange(h_BxTxD.shape[0]), last_B]
    return module.logits(h_BxD), cache


def _sample_and_record(state: State, logits_BxV, s: Settings, max_len: int) -> State:
    token_B = _next_token(logits_BxV, jax.random.fold_in(state.rng, state.step), s)
    running_B = ~state.done_B
    tokens_BxN = state.tokens_BxN.at[:, state.step].set(jnp.where(running_B, token_B, 0))
    count_B = state.count_B + running_B
    done_B = (state.done_B | (count_B >= s.max_new_tokens) | (state.lengths_B + count_B >= max_len)
              | (running_B & (token_B == state.eot_id)))
    return state.replace(tokens_BxN=tokens_BxN, count_B=count_B, done_B=done_B,
                         step=state.step + 1)


@functools.partial(jax.jit, static_argnames=("model", "s"))
def _prefill(model: GPT, s: Settings, params, prompts_BxP, lengths_B, eot_id, rng) -> State:
    B, P = prompts_BxP.shape
    positions_BxP = jnp.broadcast_to(jnp.arange(P), (B, P))
    logits_BxV, cache = model.apply({"params": params}, prompts_BxP, positions_BxP,
                                    init_cache(model.cfg, B, s.cache_len), lengths_B - 1,
                                    method=_logits_at)
    state = State(cache=cache, tokens_BxN=jnp.zeros((B, s.max_new_tokens), jnp.int32),
                  count_B=jnp.zeros(B, jnp.int32), done_B=jnp.zeros(B, bool),
                  lengths_B=lengths_B, eot_id=eot_id, step=jnp.int32(0), rng=rng)
    return _sample_and_record(state, logits_BxV, s, model.cfg.max_len)


@functools.partial(jax.jit, static_argnames=("model", "s"), donate_argnames=("state",))
def _decode_until(model: GPT, s: Settings, params, state: State, until) -> State:
    """Runs steps until `step == until` or every row is done; `until` is traced, so chunks
    of any size share one compilation."""

    def step(state: State) -> State:
        B = state.count_B.shape[0]
        last_B = state.tokens_BxN[jnp.arange(B), jnp.maximum(state.count_B - 1, 0)]
        position_B = state.lengths_B + state.count_B - 1  # a finished row rewrites its last slot
        logits_BxV, cache = model.apply({"params": params}, last_B[:, None], position_B[:, None],
                                        state.cache, jnp.zeros(B, jnp.int32), method=_logits_at)
        return _sample_and_record(state.replace(cache=cache), logits_BxV, s, model.cfg.max_len)

    return jax.lax.while_loop(lambda st: (st.step < until) & ~jnp.all(st.done_B), step, state)


def _pad_prompts(prompts, lengths, vocab_size: int, max_len: int):
    """(prompts_BxP int32, lengths_B int32) from a list of token lists or a padded array."""
    if lengths is None:
        rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
        lengths = np.array([len(r) for r in rows], dtype=np.int32)
        prompts = np.zeros((len(rows), max(lengths, default=0)), dtype=np.int64)
        for i, r in enumerate(rows):
            prompts[i, :len(r)] = r
    prompts, lengths = np.asarray(prompts), np.asarray(lengths, dtype=np.int32).reshape(-1)
    if prompts.ndim != 2 or prompts.shape[0] == 0 or prompts.shape[0] != lengths.shape[0]:
        raise ValueError(f"prompts: expected a batch of token lists (or a B x P array and B "
                         f"lengths), got shape {prompts.shape} and {lengths.shape[0]} lengths")
    if lengths.min() < 1 or lengths.max() > prompts.shape[1]:
        raise ValueError(f"prompt lengths must be in [1, {prompts.shape[1]}]: got {lengths.tolist()}")
    if lengths.max() >= max_len:
        raise ValueError(f"a prompt of {lengths.max()} tokens leaves no room in the model's "
                         f"context of {max_len}")
    valid = np.arange(prompts.shape[1])[None] < lengths[:, None]
    if np.any(valid & ((prompts < 0) | (prompts >= vocab_size))):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    prompts = np.where(valid, prompts, 0)[:, :lengths.max()]
    return prompts.astype(np.int32), lengths


def check_settings(max_new_tokens, temperature, top_k, top_p) -> None:
    """Raises ValueError naming the first setting out of range."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is not allowed: a non-negative integer")
    if not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature={temperature!r} is not allowed: a finite number >= 0 (0 is greedy)")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} is not allowed: a non-negative integer (0: off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is not allowed: in (0, 1] (1: off)")


def _run(model: GPT, params, prompts, prompt_lengths, *, max_new_tokens, rng, temperature,
         top_k, top_p, eot_id, chunk) -> Iterator[State]:
    """Yields the state after the prefill and after each chunk of at most `chunk` steps."""
    check_settings(max_new_tokens, temperature, top_k, top_p)
    cfg = model.cfg
    prompts_BxP, lengths_B = _pad_prompts(prompts, prompt_lengths, cfg.vocab_size, cfg.max_len)
    if max_new_tokens == 0:
        return
    greedy = temperature == 0  # the filters cannot change an argmax: one compilation
    s = Settings(max_new_tokens=int(max_new_tokens),
                 cache_len=min(cfg.max_len, prompts_BxP.shape[1] + int(max_new_tokens)),
                 temperature=float(temperature), top_k=0 if greedy else int(top_k),
                 top_p=1.0 if greedy else float(top_p))
    eot_id = np.int32(-1 if eot_id is None else eot_id)
    state = _prefill(model, s, params, prompts_BxP, lengths_B, eot_id, rng)
    while True:
        step, all_done = jax.device_get((state.step, jnp.all(state.done_B)))
        yield state
        if all_done or step >= max_new_tokens:
            return
        state = _decode_until(model, s, params, state, np.int32(min(step + chunk, max_new_tokens)))


def generate(model: GPT, params, prompts, *, max_new_tokens: int, rng, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eot_id: int | None = None,
             prompt_lengths: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Continues each prompt; greedy when temperature == 0, else samples (seeded by `rng`).

    `prompts` is a list of token lists, or a right-padded B x P array with `prompt_lengths`.
    Returns (tokens_BxN, lengths_B): row b's new tokens are tokens_BxN[b, :lengths_B[b]],
    ending with eot_id if it stopped there; the rest of the row is 0.
    """
    tokens_BxN = lengths_B = None
    for state in _run(model, params, prompts, prompt_lengths, max_new_tokens=max_new_tokens,
                      rng=rng, temperature=temperature, top_k=top_k, top_p=top_p, eot_id=eot_id,
                      chunk=max_new_tokens):
        tokens_BxN, lengths_B = jax.device_get((state.tokens_BxN, state.count_B))
    if tokens_BxN is None:  # max_new_tokens == 0
        B = len(prompts)
        return np.zeros((B, 0), np.int32), np.zeros(B, np.int32)
    return tokens_BxN, lengths_B


def stream(model: GPT, params, prompts, *, max_new_tokens: int, rng, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, eot_id: int | None = None,
           prompt_lengths: Sequence[int] | None = None, chunk: int = 8) -> Iterator[list[np.ndarray]]:
    """As `generate`, but yields each row's newest tokens after every `chunk` steps, so a
    caller can show text while the rest is computed. The same rng gives the same tokens."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} is not allowed: a positive integer")
    seen_B = None
    for state in _run(model, params, prompts, prompt_lengths, max_new_tokens=max_new_tokens,
                      rng=rng, temperature=temperature, top_k=top_k, top_p=top_p, eot_id=eot_id,
                      chunk=chunk):
        tokens_BxN, count_B = jax.device_get((state.tokens_BxN, state.count_B))
        if seen_B is None:
            seen_B = np.zeros_like(count_B)
        yield [row[a:b] for row, a, b in zip(tokens_BxN, seen_B, count_B)]
        seen_B = count_B
