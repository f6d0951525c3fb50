"""Evaluate a trained model: perplexity and bits per byte of a text dataset, or GPT-2's
zero-shot LAMBADA.

python -m experiments.evaluate --workdir=/tmp/run1 [--dataset=pydoc --split=validation --stride=64]
python -m experiments.evaluate --workdir=/tmp/run1 --task=lambada [--dataset=lambada_test.jsonl]

--dataset is anything `data.name` accepts (the run's corpus by default, text:PATH, or a
prepared TFDS dataset with a text feature; --feature picks one if it has several), read
as training reads it, or a .jsonl file whose lines' "text" are scored whole (OpenAI's
lambada_test.jsonl). --split=validation is the held-out split: for TFDS lambada, the
test set GPT-2 reported. Prints the metrics as JSON and writes them to
W/eval_<dataset>_<split>.json (a .jsonl file: eval_<file name>.json; LAMBADA: eval_lambada_...).
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable

from absl import flags
from tqdm import tqdm

from experiments import common
from gpt import data, evaluation
from gpt.data import corpus

TASKS = ("perplexity", "lambada")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_TASK = flags.DEFINE_enum("task", "perplexity", TASKS, "What to measure.")
_DATASET = flags.DEFINE_string(
    "dataset", "", "Corpus, text:PATH, TFDS name or .jsonl file; default: the run's corpus "
    "(perplexity), lambada (TFDS, --task=lambada).")
_SPLIT = flags.DEFINE_enum("split", "validation", ("train", "validation"),
                           "validation: the held-out split (TFDS: validation, else test).")
_FEATURE = flags.DEFINE_string("feature", "", "The text feature; default: the only one "
                               "(TFDS) or text (.jsonl).")
_STRIDE = flags.DEFINE_integer("stride", 0, "Sliding-window stride in tokens; 0: the "
                               "context length (disjoint windows).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Score only the first N texts; 0: all.")
_BATCH_TOKENS = flags.DEFINE_integer("batch_tokens", 4096, "Tokens per forward pass.")


def _jsonl_texts(path: str, feature: str) -> list[str]:
    """Each line's text, whole: evaluation examples, not a corpus to split."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    key = feature or "text"
    try:
        texts = [json.loads(line)[key] for line in lines]
    except (json.JSONDecodeError, KeyError, TypeError):
        texts = []
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"--dataset={path}: every line must be a JSON object with a string {key!r}")
    return texts


def texts(config, dataset: str, split: str, feature: str) -> tuple[str, Iterable[str]]:
    """(a name for the results file, the texts to score): a .jsonl file's as they are,
    else one split of what `data.name` accepts (the run's corpus, text:PATH, a prepared
    TFDS dataset), read as training reads it."""
    if dataset.endswith(".jsonl") and not dataset.startswith(corpus.LOCAL_PREFIX):
        return os.path.splitext(os.path.basename(dataset))[0], _jsonl_texts(dataset, feature)
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.name, data_cfg.text_feature = dataset, feature
    corpus.prepare(data_cfg, common.to_stderr)
    return f"{corpus.corpus_id(data_cfg)}_{split}", data.documents(data_cfg, split)


def evaluate(workdir: str) -> dict:
    if not workdir:
        raise ValueError("--workdir is required: a training run's directory")
    if _STRIDE.value < 0 or _LIMIT.value < 0 or _BATCH_TOKENS.value < 1:
        raise ValueError("--stride and --limit must be >= 0 and --batch_tokens >= 1")
    config, model, params = common.load_run(workdir)
    task = _TASK.value
    dataset = _DATASET.value or (config.data.name if task == "perplexity" else "lambada")
    tokenizer = data.get_tokenizer(config.data, common.to_stderr)
    common.check_vocabulary(tokenizer, config)
    name, items = texts(config, dataset, _SPLIT.value, _FEATURE.value)
    if _LIMIT.value:
        items = itertools.islice(items, _LIMIT.value)

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, unit="row", dynamic_ncols=True, leave=False)
        bar.update(done - bar.n)

    kwargs = dict(context_len=min(config.data.seq_len, model.cfg.max_len),  # positions it trained
                  batch_tokens=_BATCH_TOKENS.value, progress=progress)
    if task == "lambada":
        metrics = evaluation.lambada(model, params, tokenizer, items, **kwargs)
    else:
        metrics = evaluation.perplexity(model, params, tokenizer, items,
                                        stride=_STRIDE.value or None, **kwargs)
    if bar:
        bar.close()
    result = {"task": task, "dataset": dataset, **metrics}
    if not dataset.endswith(".jsonl"):
        result["split"] = _SPLIT.value
    stem = "eval_" + (name if task == "perplexity" else f"{task}_{name}")
    common.write_json_atomic(os.path.join(workdir, stem + ".json"), result)
    return result


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    print(json.dumps(evaluate(_WORKDIR.value), indent=2, sort_keys=True))


if __name__ == "__main__":
    common.run_program(main)
