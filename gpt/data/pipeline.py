"""From documents to batches: tokenize, end each document, pack into windows, batch.

Windows hold seq_len + 1 consecutive tokens of the concatenated token stream, so
every position has a next-token target and no token is padding; a document runs
on into the next window and several short ones share one.
"""
from __future__ import annotations

import itertools

import grain
import ml_collections
import numpy as np

from gpt.data import corpus
from gpt.data.tokenizers import Tokenizer, get_tokenizer
from gpt.model import ConfigError

Batch = dict[str, np.ndarray]  # {"inputs": int32[B, T], "targets": int32[B, T]}


def _tokenized(data_cfg: ml_collections.ConfigDict, split: str,
               tok: Tokenizer) -> grain.MapDataset:
    """Each document of `split` as int32 ids followed by the end-of-text id."""
    eot = np.array([tok.eot_id], dtype=np.int32)
    return corpus.documents(data_cfg, split).map(lambda text: np.concatenate([tok.encode(text), eot]))


def _windows(token_docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Concatenates documents and cuts the stream into inputs/targets pairs of length T."""
    packed = grain.experimental.ConcatThenSplitIterDataset(
        token_docs.map(lambda tokens: {"tokens": tokens}),
        length_struct={"tokens": seq_len + 1})
    # Only a finite stream's last window is padded (segment id 0): drop it.
    full = packed.filter(lambda w: w["tokens_segment_ids"][-1] > 0)
    return full.map(lambda w: {"inputs": w["tokens"][:-1], "targets": w["tokens"][1:]})


def _local_batch_size(data_cfg: ml_collections.ConfigDict, process_count: int) -> int:
    if data_cfg.batch_size % process_count:
        raise ConfigError("data.batch_size", f"a multiple of the {process_count} processes",
                          data_cfg.batch_size)
    return data_cfg.batch_size // process_count


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, seed: int,
                        process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
    """This host's endless train batches, int32[batch_size // process_count, seq_len].

    Each host reads its own slice of the documents and reshuffles them every
    epoch from `seed`. The iterator's get_state()/set_state() resume the exact
    stream, so it can be checkpointed beside the model with grain.checkpoint.
    """
    batch_size = _local_batch_size(data_cfg, process_count)
    tok = get_tokenizer(data_cfg)
    docs = _tokenized(data_cfg, "train", tok)[process_index::process_count]
    docs = docs.shuffle(seed=seed).repeat()
    batches = _windows(docs.to_iter_dataset(), data_cfg.seq_len).batch(
        batch_size, drop_remainder=True)
    return iter(batches)


def make_eval_batches(data_cfg: ml_collections.ConfigDict, *, num_batches: int,
                      process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """This host's part of the first `num_batches` global batches of validation, unshuffled.

    Every host packs the same global batches and keeps its own rows, so all
    hosts run the same number of eval steps and the evaluated tokens do not
    depend on the number of hosts. Fewer batches come back if validation is short.
    """
    batch_size = _local_batch_size(data_cfg, process_count)
    tok = get_tokenizer(data_cfg)
    docs = _tokenized(data_cfg, "validation", tok).to_iter_dataset()
    global_batches = _windows(docs, data_cfg.seq_len).batch(
        data_cfg.batch_size, drop_remainder=True)
    rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    batches = [{k: v[rows] for k, v in b.items()}
               for b in itertools.islice(global_batches, num_batches)]
    if not batches:
        raise ConfigError(
            "data.seq_len",
            f"short enough for data.batch_size={data_cfg.batch_size} windows of seq_len + 1 "
            f"tokens in the validation split of {data_cfg.name} "
            f"({count_tokens(data_cfg, 'validation')} tokens under {tok.name})",
            data_cfg.seq_len)
    return batches


def _token_counts(data_cfg: ml_collections.ConfigDict, split: str) -> np.ndarray:
    """How often each id occurs in `split`, end-of-text ids included: int64[vocab_size]."""
    tok = get_tokenizer(data_cfg)
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for tokens in _tokenized(data_cfg, split, tok):
        counts += np.bincount(tokens, minlength=tok.vocab_size)
    return counts


def count_tokens(data_cfg: ml_collections.ConfigDict, split: str) -> int:
    """Length of the packed token stream of `split`: what one epoch trains on."""
    return int(_token_counts(data_cfg, split).sum())


def unigram_entropy(data_cfg: ml_collections.ConfigDict, split: str = "validation") -> float:
    """Entropy in nats of the token frequencies of `split` itself.

    It is the loss of the best predictor that ignores context, fit to the very
    tokens it is scored on: a loss above it means the model has not yet learned
    even which tokens are common.
    """
    counts = _token_counts(data_cfg, split)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
