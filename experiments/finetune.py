"""Fine-tune a pre-trained run on a task with GPT-1's recipe; rerunning resumes.

python -m experiments.finetune --config=configs/finetune/sst2.py --config.init_from=W --workdir=OUT

W is a run of experiments.train or an import of experiments.convert (OpenAI's weights).
The model and tokenizer are W's (its vocabulary grown by the start / delimiter / extract
tokens); the fine-tune config's dropout rates apply. Validation metrics go to
OUT/metrics.jsonl at every train.eval_every steps and at the end.
"""
from __future__ import annotations

import math

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import common, loop
from gpt import data
from gpt.config import ConfigError, validate
from gpt.finetune import pipeline, tasks
from gpt.finetune.metrics import task_metrics
from gpt.finetune.model import GPTClassifier, load_pretrained, make_evaluate, make_loss

_CONFIG = config_flags.DEFINE_config_file("config", None, "Fine-tuning config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, logs and checkpoints.")

# What fine-tuning sets itself; every other model and data key is the pre-trained run's (its
# architecture, its tokenizer and what that tokenizer was learned from).
_FINETUNE_MODEL_KEYS = ("embd_pdrop", "resid_pdrop", "attn_pdrop")
_FINETUNE_DATA_KEYS = ("batch_size", "seq_len")


def _adopt_pretrained(config):
    """Takes the pre-trained run's model and data sections into `config`; returns its params."""
    pre_config, _, params = common.load_run(config.init_from)
    for section, own_keys in (("model", _FINETUNE_MODEL_KEYS), ("data", _FINETUNE_DATA_KEYS)):
        own = {key: config[section][key] for key in own_keys}
        config[section] = ml_collections.ConfigDict(pre_config[section].to_dict())
        config[section].update(own)
    return params


def _summarize(task: tasks.Task):
    def summarize(outputs: list[dict]) -> dict:
        cat = {k: np.concatenate([o[k] for o in outputs]) for k in ("scores", "label", "weight")}
        real = cat["weight"] > 0
        loss = sum(float(o["loss_sum"]) for o in outputs) / sum(float(o["count"]) for o in outputs)
        metrics = task_metrics(task.metrics, cat["scores"][real], cat["label"][real], task.regression)
        return {"eval/loss": loss, **{f"eval/{k}": v for k, v in metrics.items()}}

    return summarize


def set_steps(config, num_examples: int) -> None:
    """train.steps from train.epochs over `num_examples`, and optim.warmup_steps from
    optim.warmup_fraction of them."""
    epochs, fraction = config.train.epochs, config.optim.warmup_fraction
    if not (math.isfinite(epochs) and epochs > 0):
        raise ConfigError("train.epochs", "a positive number (fine-tuning sets train.steps from it)", epochs)
    if not 0 <= fraction <= 1:
        raise ConfigError("optim.warmup_fraction", "a fraction of training in [0, 1]", fraction)
    steps_per_epoch = max(1, num_examples // config.data.batch_size)
    config.train.steps = max(1, math.ceil(epochs * steps_per_epoch))
    config.optim.warmup_steps = round(fraction * config.train.steps)


def finetune(config, workdir: str) -> dict:
    task = tasks.get_task(config.task)
    workdir = common.prepare_workdir(workdir)  # a bad one fails before any data work
    pretrained = _adopt_pretrained(config) if config.init_from else None
    # [start], [delim], [extract] are new rows after the pre-trained table, however many ids
    # the tokenizer has (a table may be padded beyond them).
    tok = data.get_tokenizer(config.data, loop.progress()).with_special_tokens(
        after=config.model.vocab_size)
    config.model.vocab_size = tok.vocab_size
    config.data.seq_len = min(config.data.seq_len, config.model.max_len)
    num_devices, mesh = loop.num_devices_and_mesh(config)
    model_cfg = validate(config, num_devices)

    max_len = config.data.seq_len
    train_split = pipeline.encode(tasks.load_examples(task, config.task, "train", config.data.data_dir),
                                  task, tok, max_len, "train")
    eval_split = pipeline.encode(tasks.load_examples(task, config.task, "eval", config.data.data_dir),
                                 task, tok, max_len, "eval")
    length = pipeline.padded_length(train_split, eval_split, max_len=max_len)
    batch_size = config.data.batch_size
    set_steps(config, len(train_split.seqs))

    model = GPTClassifier(model_cfg, num_outputs=task.num_labels, num_sequences=task.num_sequences,
                          multiple_choice=task.format == "multiple_choice",
                          clf_pdrop=config.finetune.clf_pdrop, ops=common.kernels(config)[0])
    job = loop.Job(
        model=model, seq_len=length, tokens_per_step=batch_size * task.num_sequences * length,
        train_iter=pipeline.make_train_iterator(train_split, length, batch_size,
                                                seed=config.train.seed, **loop.this_host()),
        eval_batches=pipeline.make_eval_batches(eval_split, length, batch_size, **loop.this_host()),
        loss=make_loss(config.finetune.lm_coef, task.regression, model.ops.nll),
        evaluate=make_evaluate(task.regression), summarize=_summarize(task),
        initial_params=None if pretrained is None else
        (lambda fresh: load_pretrained(fresh, pretrained)),
        origin=f"from the pre-trained weights of {config.init_from}" if pretrained is not None
        else "from scratch (random weights: no pre-training)")
    return loop.run(config, workdir, job, num_devices, mesh)


def main(argv):
    config = loop.config_for_run(argv, _CONFIG.value, "configs/finetune/sst2.py")
    last = finetune(config, _WORKDIR.value)
    headline = tasks.get_task(config.task).metrics[0]
    print(f"{config.task.name}: validation {headline} {last[f'eval/{headline}']:.2f} "
          f"(" + ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in last.items()
                           if k.startswith("eval/")) + ")")


if __name__ == "__main__":
    loop.run_program(main)
