"""Language-model evaluation as the papers report it: perplexity and bits per byte of a
text with a sliding window, the summed log-likelihood of continuations, and GPT-2's
zero-shot LAMBADA with or without its stop-word filter.

Every text is scored as the model met documents in training: after an end-of-text
token, which is context only, never a target. The texts come in as any iterable of
strings, so where they come from (TFDS, a file, a test's list) is the caller's business.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt.data import Tokenizer
from gpt.model import GPT

MIN_BUCKET = 16
# NLTK's English stop-word list (nltk.corpus.stopwords.words("english"), 179 words), for
# LAMBADA's stop-word filter. GPT-2's paper does not publish its list; NLTK's is the
# common choice, and its contraction stems ("don", "wouldn") match GPT-2's first tokens
# of "don't" and "wouldn't".
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
yourselves he him his himself she she's her hers herself it it's its itself they them their
theirs themselves what which who whom this that that'll these those am is are was were be
been being have has had having do does did doing a an the and but if or because as until
while of at by for with about against between into through during before after above below
to from up down in out on off over under again further then once here there when where why
how all any both each few more most other some such no nor not only own same so than too
very s t can will just don don't should should've now d ll m o re ve y ain aren aren't
couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma
mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren
weren't won won't wouldn wouldn't""".split())


def sliding_windows(n_targets: int, context_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, scored_from) over the predictions at positions 0..n_targets-1
    (position i reads tokens[:i+1] and predicts tokens[i+1]).

    A window reads positions [begin, end), at most `context_len` of them, and scores
    [scored_from, end): the ones no earlier window scored. Windows start every `stride`
    positions, so each prediction is scored exactly once, with at least
    context_len - stride tokens of context once past the first window (stride 1: the
    whole context every time; stride = context_len: disjoint windows), as in Hugging
    Face's perplexity guide.
    """
    if not 1 <= stride <= context_len:
        raise ValueError(f"stride={stride} is not allowed: in [1, context length {context_len}]"
                         " (a larger one would skip tokens)")
    windows, scored_to = [], 0
    for begin in range(0, n_targets, stride):
        end = min(begin + context_len, n_targets)
        windows.append((begin, end, scored_to))
        scored_to = end
        if end == n_targets:
            break
    return windows


@functools.partial(jax.jit, static_argnames="model")
def _token_scores(model: GPT, params, inputs_BxT, targets_BxT, banned_V):
    """Log-probabilities of the targets, whether each is the argmax, and whether each is
    the argmax over the ids that `banned_V` (bool, or None: all) leaves."""
    logits_BxTxV = model.apply({"params": params}, inputs_BxT)
    logp_BxT = -model.ops.nll(logits_BxTxV, targets_BxT)
    correct_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
    if banned_V is None:  # no second copy of the logits
        return logp_BxT, correct_BxT, correct_BxT
    allowed_BxTxV = jnp.where(banned_V, -jnp.inf, logits_BxTxV.astype(jnp.float32))
    return logp_BxT, correct_BxT, jnp.argmax(allowed_BxTxV, axis=-1) == targets_BxT


def _bucket(length: int, context_len: int) -> int:
    """Pads batches to a power of two (one compilation per bucket, not per length)."""
    return min(context_len, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


Progress = Callable[[int, int], None]  # (rows scored, rows): lets a program show progress


def score(model: GPT, params, rows: Sequence[tuple[Sequence[int], int]], *,
          batch_tokens: int = 4096, banned_first: Sequence[int] = (),
          progress: Progress | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each row (tokens, n): the model reads tokens[:-1] in one pass, and the last n
    tokens are scored. Returns per row their log-probabilities (float64) and whether each
    was the model's argmax given the true tokens before it (teacher forcing: all n are
    argmax exactly when greedy decoding would produce all n). The first scored token's
    argmax is taken over the ids not in `banned_first`: a prediction restricted to words
    that do not begin with them.

    Rows are sorted by length and batched about `batch_tokens` tokens at a time.
    """
    context_len = model.cfg.max_len
    for tokens, n in rows:
        if not 1 <= n < len(tokens) or len(tokens) - 1 > context_len:
            raise ValueError(f"a row of {len(tokens)} tokens scoring {n} does not fit: at most "
                             f"{context_len + 1} tokens and at least one before the scored ones")
    banned_V = None
    if len(banned_first):
        banned_V = np.zeros(model.cfg.vocab_size, bool)
        banned_V[np.asarray(banned_first, np.int64)] = True
    results: list = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    start = 0
    while start < len(order):
        T = _bucket(len(rows[order[start]][0]) - 1, context_len)
        B = max(1, batch_tokens // T)
        batch = [i for i in order[start:start + B] if len(rows[i][0]) - 1 <= T]
        start += len(batch)
        inputs_BxT = np.zeros((B, T), np.int32)  # short batches are padded with empty rows
        targets_BxT = np.zeros((B, T), np.int32)
        for b, i in enumerate(batch):
            tokens = np.asarray(rows[i][0])
            inputs_BxT[b, :len(tokens) - 1] = tokens[:-1]
            targets_BxT[b, :len(tokens) - 1] = tokens[1:]
        logp_BxT, correct_BxT, allowed_correct_BxT = jax.device_get(
            _token_scores(model, params, inputs_BxT, targets_BxT, banned_V))
        for b, i in enumerate(batch):
            tokens, n = rows[i]
            first = len(tokens) - 1 - n
            correct = correct_BxT[b, first:len(tokens) - 1].copy()
            correct[0] = allowed_correct_BxT[b, first]
            results[i] = (logp_BxT[b, first:len(tokens) - 1].astype(np.float64), correct)
        if progress:
            progress(start, len(rows))
    return results


def _context_len(model: GPT, context_len: int | None) -> int:
    context_len = context_len or model.cfg.max_len
    if not 1 <= context_len <= model.cfg.max_len:
        raise ValueError(f"context_len={context_len} is not allowed: in [1, model.max_len="
                         f"{model.cfg.max_len}]")
    return context_len


def perplexity(model: GPT, params, tokenizer: Tokenizer, texts: Iterable[str], *,
               context_len: int | None = None, stride: int | None = None,
               batch_tokens: int = 4096, progress: Progress | None = None) -> dict:
    """Loss (nats/token), perplexity and bits per byte over the texts' tokens, each text
    scored on its own with `sliding_windows` (stride defaults to the context: disjoint
    windows). Bits per byte = total nats / ln 2 / UTF-8 bytes of the texts, comparable
    across tokenizers."""
    context_len = _context_len(model, context_len)
    stride = stride or context_len
    rows, n_bytes = [], 0
    for text in texts:
        tokens = np.concatenate([[tokenizer.eot_id], tokenizer.encode(text)])
        n_bytes += len(text.encode("utf-8"))
        for begin, end, scored_from in sliding_windows(len(tokens) - 1, context_len, stride):
            rows.append((tokens[begin:end + 1], end - scored_from))
    if not rows:
        raise ValueError("no tokens to score: the texts are empty")
    scores = score(model, params, rows, batch_tokens=batch_tokens, progress=progress)
    logp = np.concatenate([lp for lp, _ in scores])
    loss = -logp.sum() / len(logp)
    return {"loss": float(loss), "perplexity": float(math.exp(loss)),
            "bits_per_byte": float(-logp.sum() / math.log(2) / n_bytes),
            "tokens": int(len(logp)), "bytes": int(n_bytes),
            "context_len": int(context_len), "stride": int(stride)}


def split_last_word(passage: str) -> tuple[str, str]:
    """LAMBADA's target is the passage's last word: (context, " " + word), split at the
    last space as OpenAI's and lm-evaluation-harness's lambada_openai do."""
    context, space, word = passage.strip().rpartition(" ")
    if not space or not context or not word:
        raise ValueError(f"a LAMBADA passage needs a context and a last word: {passage[:80]!r}")
    return context, " " + word


def continuations(model: GPT, params, examples: Sequence[tuple[Sequence[int], Sequence[int]]],
                  *, context_len: int | None = None, batch_tokens: int = 4096,
                  banned_first: Sequence[int] = (), progress: Progress | None = None
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`score` of (context tokens, continuation tokens) pairs: each continuation's tokens
    given its context. Contexts longer than the window (default: the model's max_len) lose
    their oldest tokens."""
    window = _context_len(model, context_len) + 1
    rows = [((list(context) + list(target))[-window:], len(target)) for context, target in examples]
    return score(model, params, rows, batch_tokens=batch_tokens, banned_first=banned_first,
                 progress=progress)


def last_word_metrics(model: GPT, params, examples: Sequence[tuple[Sequence[int], Sequence[int]]],
                      *, context_len: int | None = None, batch_tokens: int = 4096,
                      banned_first: Sequence[int] = (), progress: Progress | None = None) -> dict:
    """For (context tokens, target tokens) pairs: accuracy (every target token is the
    greedy prediction, the first one among the ids not in `banned_first`), last-token
    accuracy (only the final one: what OpenAI's numbers appear to count), and perplexity
    of the target word, exp(mean over examples of its total nats), lm-evaluation-harness's
    per-word perplexity."""
    if not examples:
        raise ValueError("no LAMBADA passages to score")
    scores = continuations(model, params, examples, context_len=context_len,
                           batch_tokens=batch_tokens, banned_first=banned_first, progress=progress)
    nats = np.array([-lp.sum() for lp, _ in scores])
    return {"accuracy": float(np.mean([c.all() for _, c in scores])),
            "last_token_accuracy": float(np.mean([c[-1] for _, c in scores])),
            "perplexity": float(math.exp(nats.mean())),
            "examples": len(scores), "target_tokens": int(sum(len(lp) for lp, _ in scores))}


def stop_word_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids that begin a word with a space and are a whole stop-word (`STOP_WORDS`,
    any case): " the", " The", " wouldn" (of " wouldn't"). A word's first token is
    never one of them unless the word is a stop-word or starts like one (" the" + "ater"
    where the vocabulary has no " theater")."""
    ids, special = [], set(tokenizer.special_ids.values())
    for i in range(tokenizer.vocab_size):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if text[:1] == " " and text[1:].lower() in STOP_WORDS:
            ids.append(i)
    return ids


def lambada(model: GPT, params, tokenizer: Tokenizer, passages: Iterable[str], *,
            context_len: int | None = None, batch_tokens: int = 4096,
            stopword_filter: bool = False, progress: Progress | None = None) -> dict:
    """GPT-2's zero-shot LAMBADA on `passages`, each ending with its target word.

    The protocol, and where it comes from (GPT-2's paper gives no code for it):
    - Target: the last space-separated word; context: the text before that space, after
      an end-of-text token; " word" is tokenized on its own (lm-evaluation-harness,
      lambada_openai). The harness does not prefix GPT-2's contexts with end-of-text;
      we do, as every document began in training.
    - accuracy needs every token of the word (lm-evaluation-harness's acc);
      last_token_accuracy counts only its final token, which is what OpenAI's 45.99%
      (small) appears to count (openai/gpt-2#131, lm-evaluation-harness#356): an easier task.
    - perplexity is per word: exp(mean nats of the whole target word).
    - `stopword_filter`: GPT-2's paper (section 3.3) found most wrong predictions "valid
      continuations of the sentence, but not valid final words", and added "a stop-word
      filter as an approximation" to the constraint that the word ends the sentence,
      raising xl's accuracy from 52.66% to 63.24% (Table 3 reports the filtered figure).
      The list and rule were not published. Ours: the predicted word may not be a
      stop-word, i.e. the first token is predicted among the ids `stop_word_ids` leaves
      (NLTK's English list); perplexity is unchanged.
    - Text: OpenAI scored its own detokenized copy of the 5,153 test passages
      (lambada_test.jsonl, the harness's lambada_openai); TFDS `lambada` is the original
      release, lower-cased and tokenized ("`` no , '' he said"), on which GPT-2 scores lower.
    """
    examples = []
    for passage in passages:
        context, target = split_last_word(passage)
        examples.append(([tokenizer.eot_id, *tokenizer.encode(context)], tokenizer.encode(target)))
    banned = stop_word_ids(tokenizer) if stopword_filter else ()
    metrics = last_word_metrics(model, params, examples, context_len=context_len,
                                batch_tokens=batch_tokens, banned_first=banned, progress=progress)
    return {**metrics, "stopword_filter": stopword_filter}
