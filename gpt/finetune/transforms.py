"""GPT-1's task-aware input transformations (Radford et al., 2018, section 3.3).

Every task becomes one or more token sequences `[start] ... [extract]`, so the
pre-trained model is used as it is and only a linear classifier is new:

- classification:   [start] text [extract]
- entailment:       [start] premise [delim] hypothesis [extract]
- similarity:       both orders, [start] a [delim] b [extract] and [start] b [delim] a
                    [extract]; the two final hidden states are summed
- multiple choice:  [start] context [delim] answer_k [extract] for each answer k; a
                    softmax over the answers

Truncation follows the released code (openai/finetune-transformer-lm train.py,
`transform_roc`: `[start] + x1[:max_len] + [delimiter] + x2[:max_len] + [clf_token]` with
`max_len = n_ctx // 2 - 2`): a sequence with two texts, a multiple-choice context and
answer included, keeps the FIRST max_len // 2 - 2 tokens of each. A single text keeps its
first max_len - 2 (the release has no single-text task). A RACE context (article then
question) longer than the budget therefore loses its question, as it would in the release.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from gpt.data.tokenizers import FINETUNE_TOKENS, Tokenizer

FORMATS = ("classification", "entailment", "similarity", "multiple_choice")
START, DELIM, EXTRACT = FINETUNE_TOKENS


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled example. `texts`: (text,) for classification, (a, b) for entailment and
    similarity, (context,) for multiple choice, whose answers are `choices`. `label`: a
    class index, a choice index, or a score (regression)."""

    texts: tuple[str, ...]
    label: float
    choices: tuple[str, ...] = ()


def expected_texts(fmt: str) -> int:
    return 2 if fmt in ("entailment", "similarity") else 1


def sequences(example: Example, fmt: str, tok: Tokenizer, max_len: int) -> list[np.ndarray]:
    """The example's token sequences (one per order or answer), each ending in [extract]."""
    start, delim, extract = (tok.special_ids[name] for name in FINETUNE_TOKENS)
    parts = [tok.encode(text) for text in example.texts]
    pair_budget = max(max_len // 2 - 2, 0)

    def seq(*pieces):
        return np.concatenate([[start], *pieces, [extract]]).astype(np.int32)

    if fmt == "classification":
        return [seq(parts[0][:max_len - 2])]
    if fmt in ("entailment", "similarity"):
        a, b = (p[:pair_budget] for p in parts)
        orders = [(a, b), (b, a)] if fmt == "similarity" else [(a, b)]
        return [seq(x, [delim], y) for x, y in orders]
    context = parts[0][:pair_budget]
    return [seq(context, [delim], tok.encode(answer)[:pair_budget]) for answer in example.choices]


def to_arrays(seqs: list[np.ndarray], label: float, length: int) -> dict[str, np.ndarray]:
    """One example as fixed-shape arrays: tokens [C, length] (right-padded with zeros, which
    the causal mask keeps out of every real position), extract [C] (where [extract] is),
    lengths [C], label, and weight 1 (padding examples get 0)."""
    tokens = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    lengths = np.array([len(s) for s in seqs], np.int32)
    return {"tokens": tokens, "extract": lengths - 1, "lengths": lengths,
            "label": np.float32(label), "weight": np.float32(1.0)}
