"""Evaluate a trained model: perplexity and bits per byte of a text dataset, GPT-2's
zero-shot LAMBADA, or GPT-2's whole zero-shot table.

python -m experiments.evaluate --workdir=/tmp/run1 [--dataset=pydoc --split=validation --stride=64]
python -m experiments.evaluate --workdir=/tmp/run1 --task=lambada [--dataset=lambada_test.jsonl] [--stopword_filter]
python -m experiments.evaluate --workdir=/tmp/run1 --suite=gpt2_zero_shot --data_root=DIR

--dataset is anything `data.name` accepts (the run's corpus by default, text:PATH, or a
prepared TFDS dataset with a text feature; --feature picks one if it has several), read
as training reads it, or a .jsonl file whose lines' "text" are scored whole (OpenAI's
lambada_test.jsonl). --split=validation is the held-out split: for TFDS lambada, the
test set GPT-2 reported; for the built-in corpus and text:PATH, the held-out tail of each
document (about a tenth of the text), so --split=all scores the train and validation
parts too. Prints the metrics as JSON and writes them to W/eval_<dataset>_<split>.json
(a .jsonl file: eval_<file name>.json; LAMBADA: eval_lambada_...).

--suite=gpt2_zero_shot scores each benchmark of GPT-2's Table 3 (and HellaSwag) whose
release file is under --data_root (paths: docs/zero_shot.md; 1BW also from a
prepared TFDS lm1b), prints a table beside the paper's figures for the nearest GPT-2 size,
and writes W/zero_shot.json and W/zero_shot.md.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Sequence

from absl import flags
from tqdm import tqdm

from experiments import common
from gpt import data, evaluation, zero_shot
from gpt.data import corpus

TASKS = ("perplexity", "lambada")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_TASK = flags.DEFINE_enum("task", "perplexity", TASKS, "What to measure.")
_DATASET = flags.DEFINE_string(
    "dataset", "", "Corpus, text:PATH, TFDS name or .jsonl file; default: the run's corpus "
    "(perplexity), lambada (--task=lambada: TFDS's lambada, the original release, lower-cased "
    "and tokenized, not OpenAI's lambada_test.jsonl that GPT-2 was scored on).")
_SPLIT = flags.DEFINE_enum("split", "validation", ("train", "validation", "all"),
                           "validation: the held-out split (TFDS: validation, else test; the "
                           "built-in corpus and text:PATH: each document's held-out tail); "
                           "all: train, then validation.")
_FEATURE = flags.DEFINE_string("feature", "", "The text feature; default: the only one "
                               "(TFDS) or text (.jsonl).")
_STRIDE = flags.DEFINE_integer("stride", 0, "Sliding-window stride in tokens; 0: the "
                               "context length (disjoint windows).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Score only the first N texts; 0: all.")
_BATCH_TOKENS = flags.DEFINE_integer("batch_tokens", 4096, "Tokens per forward pass.")
_STOPWORD_FILTER = flags.DEFINE_bool(
    "stopword_filter", False, "LAMBADA: predict the word among those that are not stop-words, "
    "GPT-2's filter behind its Table 3 accuracy.")
_SUITE = flags.DEFINE_enum("suite", None, ("gpt2_zero_shot",),
                           "Score a suite of benchmarks instead of one --task.")
_DATA_ROOT = flags.DEFINE_string("data_root", "", "--suite: the directory holding the "
                                 "benchmarks' release files.")


def texts(config, dataset: str, split: str, feature: str) -> tuple[str, Iterable[str]]:
    """(a name for the results file, the texts to score): a .jsonl file's as they are,
    else one split of what `data.name` accepts (the run's corpus, text:PATH, a prepared
    TFDS dataset), read as training reads it."""
    if dataset.endswith(".jsonl") and not dataset.startswith(corpus.LOCAL_PREFIX):
        passages = zero_shot.read_jsonl(dataset, feature or "text")
        if not all(isinstance(p, str) for p in passages):
            raise ValueError(f"--dataset={dataset}: every {feature or 'text'!r} must be a string")
        return os.path.splitext(os.path.basename(dataset))[0], passages
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.name, data_cfg.text_feature = dataset, feature
    corpus.prepare(data_cfg, common.to_stderr)
    splits = corpus.SPLITS if split == "all" else (split,)
    return (f"{corpus.corpus_id(data_cfg)}_{split}",
            itertools.chain.from_iterable(data.documents(data_cfg, s) for s in splits))


class _Bars:
    """One tqdm bar per scored thing, on stderr, closed when the next one starts."""

    def __init__(self):
        self.bar = None

    def __call__(self, label: str = "") -> evaluation.Progress:
        self.close()

        def progress(done: int, total: int) -> None:
            self.bar = self.bar or tqdm(total=total, desc=label or None, unit="row",
                                        dynamic_ncols=True, leave=False)
            self.bar.update(done - self.bar.n)
        return progress

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        self.bar = None


def _lm1b_sentences(config) -> Sequence[str] | None:
    """TFDS lm1b's test sentences where it is prepared (in the run's data.data_dir), else None."""
    try:
        source = corpus.tfds_split("lm1b", "test", config.data.data_dir)
    except FileNotFoundError:
        return None
    return [t.decode("utf-8") if isinstance(t, bytes) else t for t in (ex["text"] for ex in source)]


def suite(workdir: str, config, model, params, tokenizer, **kwargs) -> dict:
    """GPT-2's zero-shot table: prints it, writes zero_shot.json and zero_shot.md."""
    bars = _Bars()
    result = zero_shot.gpt2_zero_shot(
        model, params, tokenizer, _DATA_ROOT.value, stride=_STRIDE.value or None,
        stopword_filter=_STOPWORD_FILTER.value, lm1b_sentences=lambda: _lm1b_sentences(config),
        progress=bars, **kwargs)
    bars.close()
    if not result["rows"]:
        raise FileNotFoundError(f"--data_root={_DATA_ROOT.value} holds none of the benchmarks' "
                                f"files: {', '.join(zero_shot.FILES.values())}")
    common.write_json_atomic(os.path.join(workdir, "zero_shot.json"), result)
    table = zero_shot.markdown(result)
    with open(os.path.join(workdir, "zero_shot.md"), "w") as f:
        f.write(table)
    return table


def evaluate(workdir: str):
    if not workdir:
        raise ValueError("--workdir is required: a training run's directory")
    if _STRIDE.value < 0 or _LIMIT.value < 0 or _BATCH_TOKENS.value < 1:
        raise ValueError("--stride and --limit must be >= 0 and --batch_tokens >= 1")
    given = [f"--{name}" for name in ("task", "dataset", "split", "feature", "limit")
             if flags.FLAGS[name].present]
    if _SUITE.value and given:
        raise ValueError(f"--suite scores its own benchmarks' test sets: drop {', '.join(given)}")
    if _STOPWORD_FILTER.value and not _SUITE.value and _TASK.value != "lambada":
        raise ValueError("--stopword_filter is LAMBADA's: use it with --task=lambada or --suite")
    if _SUITE.value and not os.path.isdir(_DATA_ROOT.value):
        raise ValueError(f"--data_root={_DATA_ROOT.value!r} must be a directory holding the "
                         f"benchmarks' files, e.g. {', '.join(zero_shot.FILES.values())}")
    config, model, params = common.load_run(workdir)
    tokenizer = data.get_tokenizer(config.data, common.to_stderr)
    kwargs = dict(context_len=min(config.data.seq_len, model.cfg.max_len),  # positions it trained
                  batch_tokens=_BATCH_TOKENS.value)
    if _SUITE.value:
        return suite(workdir, config, model, params, tokenizer, **kwargs)
    task = _TASK.value
    dataset = _DATASET.value or (config.data.name if task == "perplexity" else "lambada")
    name, items = texts(config, dataset, _SPLIT.value, _FEATURE.value)
    if _LIMIT.value:
        items = itertools.islice(items, _LIMIT.value)
    bars = _Bars()
    if task == "lambada":
        metrics = evaluation.lambada(model, params, tokenizer, items, progress=bars(),
                                     stopword_filter=_STOPWORD_FILTER.value, **kwargs)
    else:
        metrics = evaluation.perplexity(model, params, tokenizer, items, progress=bars(),
                                        stride=_STRIDE.value or None, **kwargs)
    bars.close()
    result = {"task": task, "dataset": dataset, **metrics}
    if not dataset.endswith(".jsonl"):
        result["split"] = _SPLIT.value
    stem = "eval_" + (name if task == "perplexity" else f"{task}_{name}")
    common.write_json_atomic(os.path.join(workdir, stem + ".json"), result)
    return json.dumps(result, indent=2, sort_keys=True)


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    print(evaluate(_WORKDIR.value))


if __name__ == "__main__":
    common.run_program(main)
