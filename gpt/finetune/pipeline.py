"""Examples -> fixed-shape batches: every batch of a run has one shape, so the steps
compile once. Train batches are shuffled every epoch from the seed and are resumable
(grain); eval batches cover each example once, in order, the last padded with examples
of weight 0."""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from gpt.data.tokenizers import Tokenizer
from gpt.finetune.tasks import Task
from gpt.finetune.transforms import Example, expected_texts, sequences, to_arrays

Batch = dict[str, np.ndarray]
LENGTH_MULTIPLE = 8  # pad sequences to a multiple of 8 tokens


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A split as token sequences: seqs[i] holds example i's C sequences."""

    seqs: list[list[np.ndarray]]
    labels: np.ndarray

    @property
    def max_len(self) -> int:
        return max(len(s) for example in self.seqs for s in example)


def _check(example: Example, task: Task, index: int, split: str) -> None:
    where = f"{split} example {index}"
    if len(example.texts) != expected_texts(task.format):
        raise ValueError(f"{where}: a {task.format} example has {expected_texts(task.format)} "
                         f"text(s), not {len(example.texts)}")
    if task.format == "multiple_choice" and len(example.choices) != task.num_labels:
        raise ValueError(f"{where}: {len(example.choices)} choices; task.num_labels={task.num_labels}")
    if not task.regression and (example.label != int(example.label)
                                or not 0 <= example.label < task.num_labels):
        raise ValueError(f"{where}: label {example.label!r} is not an index below {task.num_labels}")


def encode(examples: list[Example], task: Task, tok: Tokenizer, max_len: int,
           split: str) -> Encoded:
    for i, example in enumerate(examples):
        _check(example, task, i, split)
    return Encoded([sequences(e, task.format, tok, max_len) for e in examples],
                   np.array([e.label for e in examples], np.float32))


def padded_length(*splits: Encoded, max_len: int) -> int:
    longest = max(split.max_len for split in splits)
    return min(-(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, max_len)


def _as_dataset(split: Encoded, length: int) -> grain.MapDataset:
    return grain.MapDataset.range(len(split.seqs)).map(
        lambda i: to_arrays(split.seqs[i], split.labels[i], length))


def make_train_iterator(split: Encoded, length: int, batch_size: int, *, seed: int,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """This host's endless, epoch-wise reshuffled train batches of batch_size // process_count."""
    ds = _as_dataset(split, length)[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat().batch(batch_size // process_count, drop_remainder=True)
    return iter(ds.to_iter_dataset())


def make_eval_batches(split: Encoded, length: int, batch_size: int, *, process_index: int = 0,
                      process_count: int = 1) -> list[Batch]:
    """This host's rows of every global eval batch; the last batch is completed with copies
    of the first example at weight 0."""
    ds = _as_dataset(split, length)
    pad = -len(ds) % batch_size
    local = batch_size // process_count
    rows = slice(process_index * local, (process_index + 1) * local)
    batches = []
    for start in range(0, len(ds) + pad, batch_size):
        examples = [ds[i] if i < len(ds) else {**ds[0], "weight": np.float32(0.0)}
                    for i in range(start, start + batch_size)]
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        batches.append({k: v[rows] for k, v in batch.items()})
    return batches
