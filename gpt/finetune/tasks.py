"""The fine-tuning tasks of GPT-1's table 2-4, read from TFDS, plus the user's own.

`task.name` is a task below (its data come from a prepared TFDS dataset) or
`jsonl:DIR`: DIR/train.jsonl and DIR/validation.jsonl, one example per line, with the
fields of its `task.format`:
  classification {"text", "label"}; entailment and similarity {"text_a", "text_b",
  "label"}; multiple_choice {"context", "choices": [...], "label": index of the answer}.
Texts are strings, choices a list of strings, a label an integer (a class or an answer's
index) or, for a regression (num_labels 1), a finite number.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable

import ml_collections

from gpt.data import corpus
from gpt.finetune.metrics import METRICS, REGRESSION_METRICS
from gpt.finetune.transforms import FORMATS, Example
from gpt.config import ConfigError

JSONL_PREFIX = "jsonl:"


@dataclasses.dataclass(frozen=True)
class Task:
    format: str
    num_labels: int  # classes; 1: regression; multiple choice: answers per example
    metrics: tuple[str, ...]  # the first one is the task's headline number
    tfds_names: tuple[str, ...] = ()  # the TFDS datasets whose examples, in order, it holds
    train_split: str = "train"
    eval_split: str = "validation"
    examples: Callable[[dict], Iterable[Example]] | None = None  # TFDS row -> examples

    @property
    def num_sequences(self) -> int:
        """Token sequences per example: one per answer, both orders, or one."""
        if self.format == "multiple_choice":
            return self.num_labels
        return 2 if self.format == "similarity" else 1

    @property
    def regression(self) -> bool:
        return self.format != "multiple_choice" and self.num_labels == 1


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _fields(*names: str) -> Callable[[dict], Iterable[Example]]:
    """GLUE-style rows: texts in `names`, an integer class or a score in "label"; GLUE's
    unlabelled rows (label -1) are skipped."""

    def examples(row):
        if row["label"] >= 0:
            yield Example(tuple(_text(row[n]) for n in names), float(row["label"]))

    return examples


def _race(row):
    """One example per question; the context is the article then the question ([z; q])."""
    for question, options, answer in zip(row["questions"], row["options"], row["answers"]):
        yield Example((f"{_text(row['article'])}\n{_text(question)}",),
                      float("ABCD".index(_text(answer))), tuple(_text(o) for o in options))


def _story_cloze(row):
    """The four-sentence story, its two endings, and the right one (TFDS: 1 or 2)."""
    yield Example((_text(row["context"]),), float(row["label"] - 1),
                  tuple(_text(e) for e in row["endings"]))


_GLUE = "glue/"
TASKS = {
    "sst2": Task("classification", 2, ("accuracy",), (_GLUE + "sst2",), examples=_fields("sentence")),
    "cola": Task("classification", 2, ("matthews_corr", "accuracy"), (_GLUE + "cola",),
                 examples=_fields("sentence")),
    "mrpc": Task("similarity", 2, ("f1", "accuracy"), (_GLUE + "mrpc",),
                 examples=_fields("sentence1", "sentence2")),
    "qqp": Task("similarity", 2, ("f1", "accuracy"), (_GLUE + "qqp",),
                examples=_fields("question1", "question2")),
    "stsb": Task("similarity", 1, ("pearson", "spearman"), (_GLUE + "stsb",),
                 examples=_fields("sentence1", "sentence2")),
    "mnli": Task("entailment", 3, ("accuracy",), (_GLUE + "mnli",), eval_split="validation_matched",
                 examples=_fields("premise", "hypothesis")),
    "qnli": Task("entailment", 2, ("accuracy",), (_GLUE + "qnli",),
                 examples=_fields("question", "sentence")),
    "rte": Task("entailment", 2, ("accuracy",), (_GLUE + "rte",),
                examples=_fields("sentence1", "sentence2")),
    # GPT-1's SNLI, SciTail and RACE figures (tables 2, 3) are test-set accuracies, labels
    # public; GLUE's test labels are not, so the GLUE tasks report validation.
    "snli": Task("entailment", 3, ("accuracy",), ("snli",), eval_split="test",
                 examples=_fields("premise", "hypothesis")),
    "scitail": Task("entailment", 2, ("accuracy",), ("sci_tail",), eval_split="test",
                    examples=_fields("premise", "hypothesis")),
    # GPT-1's "RACE" is the union of the high- and middle-school sets.
    "race": Task("multiple_choice", 4, ("accuracy",), ("race/high", "race/middle"),
                 eval_split="test", examples=_race),
    "race_high": Task("multiple_choice", 4, ("accuracy",), ("race/high",), eval_split="test",
                      examples=_race),
    "race_middle": Task("multiple_choice", 4, ("accuracy",), ("race/middle",), eval_split="test",
                        examples=_race),
    # Story Cloze has no training set: the released code trains on 1,497 stories of the 2016
    # validation set (1,871; drawn at random there, the first 80% here, which TFDS rounds to
    # 1,497), keeps 374 to validate, and GPT-1 reports the test set (1,871). TFDS needs the
    # files downloaded by hand (see its error).
    "story_cloze": Task("multiple_choice", 2, ("accuracy",), ("story_cloze/2016",),
                        train_split="validation[:80%]", eval_split="test",
                        examples=_story_cloze),
}
_JSONL_FIELDS = {"classification": ("text",), "entailment": ("text_a", "text_b"),
                 "similarity": ("text_a", "text_b"), "multiple_choice": ("context",)}


def get_task(task_cfg: ml_collections.ConfigDict) -> Task:
    """The task `task.name` names. A registered task may override its splits; a jsonl task
    takes its format, number of labels and metrics from the config."""
    name = task_cfg.name
    if name in TASKS:
        task = TASKS[name]
        return dataclasses.replace(task, train_split=task_cfg.train_split or task.train_split,
                                   eval_split=task_cfg.eval_split or task.eval_split)
    if not name.startswith(JSONL_PREFIX):
        raise ConfigError("task.name", f"one of {', '.join(TASKS)} or {JSONL_PREFIX}DIR", name)
    if task_cfg.format not in FORMATS:
        raise ConfigError("task.format", f"one of {', '.join(FORMATS)} (for a jsonl task)",
                          task_cfg.format)
    if not isinstance(task_cfg.num_labels, int) or task_cfg.num_labels < 1:
        raise ConfigError("task.num_labels", "a positive integer (1: regression)", task_cfg.num_labels)
    metrics = tuple(task_cfg.metrics)
    regression = task_cfg.format != "multiple_choice" and task_cfg.num_labels == 1
    allowed = REGRESSION_METRICS if regression else tuple(m for m in METRICS if m not in REGRESSION_METRICS)
    if not metrics or any(m not in allowed for m in metrics):
        raise ConfigError("task.metrics", f"one or more of {', '.join(allowed)}", metrics)
    return Task(task_cfg.format, task_cfg.num_labels, metrics,
                train_split=task_cfg.train_split or "train",
                eval_split=task_cfg.eval_split or "validation")


def _jsonl_example(row: dict, fmt: str, num_labels: int) -> Example:
    """One jsonl row as an Example; ValueError names the field that is wrong."""
    for name in _JSONL_FIELDS[fmt]:
        if not isinstance(row[name], str):
            raise ValueError(f"field {name!r} is {row[name]!r}; it must be a string")
    choices = row.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"field 'choices' is {choices!r}; it must be a list of strings")
    label = row["label"]
    if num_labels == 1 and fmt != "multiple_choice":
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
            raise ValueError(f"field 'label' is {label!r}; it must be a finite number (a regression target)")
    elif isinstance(label, bool) or not (isinstance(label, int)
                                         or isinstance(label, float) and label.is_integer()):
        raise ValueError(f"field 'label' is {label!r}; it must be an integer, the index of the "
                         f"{'answer' if fmt == 'multiple_choice' else 'class'}")
    return Example(tuple(row[name] for name in _JSONL_FIELDS[fmt]), float(label), tuple(choices))


def _jsonl_examples(path: str, fmt: str, num_labels: int) -> list[Example]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task.name: {path} does not exist (a jsonl task needs "
                                f"train.jsonl and validation.jsonl in its directory)")
    needed = (*_JSONL_FIELDS[fmt], "label") + (("choices",) if fmt == "multiple_choice" else ())
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                missing = [k for k in needed if k not in row]
            except json.JSONDecodeError:
                row, missing = None, None
            if not isinstance(row, dict) or missing:
                raise ValueError(f"{path}:{number}: a {fmt} example is a JSON object with "
                                 f"{', '.join(needed)}" + (f"; missing {', '.join(missing)}" if missing else ""))
            try:
                examples.append(_jsonl_example(row, fmt, num_labels))
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def load_examples(task: Task, task_cfg: ml_collections.ConfigDict, split: str,
                  data_dir: str = "") -> list[Example]:
    """All examples of the task's `split` ("train" or "eval"), in the dataset's order."""
    tfds_split = task.train_split if split == "train" else task.eval_split
    if task_cfg.name.startswith(JSONL_PREFIX):
        directory = task_cfg.name[len(JSONL_PREFIX):]
        return _jsonl_examples(os.path.join(directory, f"{tfds_split}.jsonl"),
                               task.format, task.num_labels)
    examples = []
    for name in task.tfds_names:
        source = corpus.tfds_split(name, tfds_split, data_dir, key="task.name")
        examples += [example for i in range(len(source)) for example in task.examples(source[i])]
    return examples
