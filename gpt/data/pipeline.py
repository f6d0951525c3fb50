"""From documents to batches: tokenize, end each document, pack into windows, batch.

Windows hold seq_len + 1 consecutive tokens of the concatenated token stream, so
every position has a next-token target and no token is padding; a document runs
on into the next window and several short ones share one.
"""
from __future__ import annotations

import functools
import itertools
import os
import threading
import time
import weakref

import grain
import ml_collections
import numpy as np
from absl import flags

from gpt.data import corpus
from gpt.data.tokenizers import Tokenizer, get_tokenizer
from gpt.config import ConfigError

Batch = dict[str, np.ndarray]  # {"inputs": int32[B, T], "targets": int32[B, T]}
WORKER_BUFFER = 16  # documents each tokenizing worker keeps ready


def _tokenized(data_cfg: ml_collections.ConfigDict, split: str,
               tok: Tokenizer) -> grain.MapDataset:
    """Each document of `split` as int32 ids followed by the end-of-text id."""
    eot = np.array([tok.eot_id], dtype=np.int32)
    return corpus.documents(data_cfg, split).map(lambda text: np.concatenate([tok.encode(text), eot]))


def _one_by_one(docs: grain.MapDataset) -> grain.IterDataset:
    """`docs` read in order in the calling thread. Grain's default 16 reader threads only
    contend for the GIL over CPU-bound tokenizing (half the tokens/s on 2 cores);
    the parallelism is `data.num_workers` processes instead."""
    return docs.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


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


def _non_negative(data_cfg: ml_collections.ConfigDict, key: str) -> int:
    value = data_cfg[key]
    if value < 0:  # ConfigDict keeps it an int
        raise ConfigError(f"data.{key}", "a non-negative integer", value)
    return value


def _tokenizing_workers(docs: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """`docs` tokenized by `num_workers` processes, in the same order as by one.

    Worker i takes documents i, i + n, i + 2n, ... of the endless stream and
    grain takes one from each worker in turn, so the stream is unchanged. The
    iterator's state then holds each worker's position: a checkpoint resumes
    only with the same number of workers. Workers are spawned processes that
    import the main module, so a script must keep its work under
    `if __name__ == "__main__":`.
    """
    if not flags.FLAGS.is_parsed():
        # grain 0.2.18 reads one of its absl flags when it starts workers, which fails
        # outside an absl program (a test, a notebook): google/grain#1355.
        flags.FLAGS.mark_as_parsed()
    return docs.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=WORKER_BUFFER),
        worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))


def _exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
    """Ends a tokenizing worker within a second of the death of `parent`, the process that
    started it, however it died (kill -9 included): grain's workers would otherwise outlive
    it by minutes. The parent's pid comes from the parent, since a worker still starting up
    when its parent dies would read its new parent's pid (1) from os.getppid()."""
    del worker_index, worker_count

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, seed: int,
                        process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
    """This host's endless train batches, int32[batch_size // process_count, seq_len].

    Each host reads its own slice of the documents and reshuffles them every
    epoch from `seed`; `data.num_workers` processes tokenize and a thread packs
    `data.prefetch` batches ahead, neither changing the batches. The iterator's
    get_state()/set_state() resume the exact stream, so it can be checkpointed
    beside the model with grain.checkpoint.
    """
    num_workers = _non_negative(data_cfg, "num_workers")
    prefetch = _non_negative(data_cfg, "prefetch")
    batch_size = _local_batch_size(data_cfg, process_count)
    tok = get_tokenizer(data_cfg)
    docs = _tokenized(data_cfg, "train", tok)[process_index::process_count]
    docs = _one_by_one(docs.shuffle(seed=seed).repeat())
    if num_workers:
        docs = _tokenizing_workers(docs, num_workers)
    batches = _windows(docs, data_cfg.seq_len).batch(batch_size, drop_remainder=True)
    iterator = iter(grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch))
    _close_at_exit(iterator)
    return iterator


def _close_at_exit(iterator: grain.DatasetIterator) -> None:
    """Stops the prefetching thread before Python exits, if the caller has not closed the
    iterator: a thread still reading at shutdown aborts the process (SIGABRT)."""
    alive = weakref.ref(iterator)
    weakref.finalize(iterator, lambda: alive() is not None and alive().close())


def make_eval_batches(data_cfg: ml_collections.ConfigDict, *, num_batches: int, micro_batch_rows: int = 1,
                      process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """This host's part of the first `num_batches` global batches of validation, unshuffled.

    Every host packs the same global batches and keeps its own rows, so all
    hosts run the same number of eval steps and the evaluated tokens do not
    depend on the number of hosts. Fewer batches come back if validation is short;
    if it holds less than one global batch, the one batch is all its windows cut to a
    multiple of `micro_batch_rows` (what the eval step takes at a time over all devices,
    a multiple of the process count): every batch has the same rows, so the mean of the
    batches' mean losses is the mean over tokens.
    """
    tok = get_tokenizer(data_cfg)
    docs = _one_by_one(_tokenized(data_cfg, "validation", tok))
    global_batches = list(itertools.islice(_windows(docs, data_cfg.seq_len).batch(data_cfg.batch_size),
                                           num_batches))
    if len(global_batches) > 1 and len(global_batches[-1]["inputs"]) < data_cfg.batch_size:
        global_batches.pop()  # a short last batch would weigh its tokens more
    windows = len(global_batches[0]["inputs"]) if global_batches else 0
    rows = windows // micro_batch_rows * micro_batch_rows
    if rows == 0:
        raise ConfigError(
            "data.name",
            f"a corpus whose validation split holds at least {micro_batch_rows} windows of "
            f"data.seq_len + 1 = {data_cfg.seq_len + 1} tokens (one eval micro-batch over all devices); "
            f"it has {count_tokens(data_cfg, 'validation'):,} tokens under {tok.name}", data_cfg.name)
    local = rows // process_count
    mine = slice(process_index * local, (process_index + 1) * local)
    return [{k: v[mine] for k, v in b.items()} for b in global_batches]


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
