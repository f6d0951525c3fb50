"""Train a GPT from a config file; rerunning the same command resumes from the latest checkpoint.

python -m experiments.train --config=configs/gpt1.py:tiny --workdir=/tmp/run1 \
    [--config.model.norm_position=pre ...]
"""
from __future__ import annotations

import math

from absl import flags
from ml_collections import config_flags

from experiments import common, loop
from gpt import data
from gpt.data import corpus
from gpt.config import eval_micro_batch, validate
from gpt.model import GPT

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, logs and checkpoints.")


def _resolve_steps(config) -> None:
    """GPT-1 trained for a number of epochs: turn them into optimizer steps for this corpus."""
    if config.train.epochs > 0:
        tokens_per_step = config.data.batch_size * config.data.seq_len
        config.train.steps = max(1, math.ceil(
            config.train.epochs * data.count_tokens(config.data, "train") / tokens_per_step))


def train_and_evaluate(config, workdir: str) -> dict:
    """Pre-trains (or resumes); returns the last logged metrics."""
    num_devices, mesh = loop.num_devices_and_mesh(config)
    model_cfg = validate(config, num_devices)
    workdir = common.prepare_workdir(workdir)  # a bad one fails before any corpus is prepared
    # Preparing a corpus or learning a BPE (once per data_dir) says so in one line, always, and
    # draws the libraries' bars on a terminal; other hosts keep quiet.
    progress = loop.progress()
    corpus.prepare(config.data, progress)
    common.check_vocabulary(data.get_tokenizer(config.data, progress), config)
    _resolve_steps(config)
    job = loop.Job(
        model=GPT(model_cfg, common.kernels(config)[0]), seq_len=config.data.seq_len,
        tokens_per_step=config.data.batch_size * config.data.seq_len,
        train_iter=data.make_train_iterator(config.data, seed=config.train.seed, **loop.this_host()),
        eval_batches=data.make_eval_batches(
            config.data, num_batches=config.train.eval_steps,
            micro_batch_rows=eval_micro_batch(config, num_devices) * num_devices, **loop.this_host()),
        corpus=corpus.corpus_id(config.data))
    return loop.run(config, workdir, job, num_devices, mesh)


def main(argv):
    config = loop.config_for_run(argv, _CONFIG.value, "configs/gpt1.py:tiny")
    last = train_and_evaluate(config, _WORKDIR.value)
    if "eval/loss" in last:
        entropy = data.unigram_entropy(config.data)
        print(f"final eval loss {last['eval/loss']:.4f} nats/token "
              f"(unigram entropy of the corpus: {entropy:.4f}; lower means the model learned context)")


if __name__ == "__main__":
    loop.run_program(main)
