"""Hugging Face checkpoints in and out of a run directory.

python -m experiments.convert --hf_dir=DIR --workdir=OUT [--config=configs/gpt2.py:small]
python -m experiments.convert --workdir=W --to_hf=DIR

The first writes OUT/config.json and a step-0 checkpoint (the imported weights, a fresh
optimizer state), so `experiments.train` fine-tunes from it and sampling and evaluation
load it like any run. The config's data, optim and train sections come from --config
(default: configs/gpt2.py:small for GPT-2, configs/gpt1.py for openai-gpt); an openai-gpt
checkpoint's own tokenizer.json becomes the run's tokenizer (GPT-2's is built in).
"""
from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from experiments import common
from gpt import convert, data
from gpt.checkpoint import Checkpointer
from gpt.config import model_config, validate
from gpt.model import GPT
from gpt.optim import make_optimizer
from gpt.train_step import create_state

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose data/optim/train sections the run uses.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "A Hugging Face checkpoint directory to import.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory to write (import) or read (export).")
_TO_HF = flags.DEFINE_string("to_hf", None, "Export the run's latest checkpoint to this directory.")


def import_hf(hf_dir: str, workdir: str, config) -> None:
    cfg, params = convert.from_hf(hf_dir)
    if config is None:
        from configs import gpt1, gpt2
        config = gpt2.get_config("small") if cfg.norm_position == "pre" else gpt1.get_config("")
    for key, value in vars(cfg).items():
        config.model[key] = value
    if convert.architecture(cfg).model_type == "openai-gpt" and os.path.isfile(
            os.path.join(hf_dir, "tokenizer.json")):  # GPT-1's own BPE, not one learned here
        config.data.tokenizer = data.HF_PREFIX + os.path.abspath(hf_dir)
    config.data.seq_len = min(config.data.seq_len, cfg.max_len)
    validate(config)
    workdir = common.prepare_workdir(workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    if ckpt.all_steps():
        raise ValueError(f"--workdir={workdir} already holds checkpoints; choose an empty directory")
    model = GPT(model_config(config))
    tx, _ = make_optimizer(config.optim, config.train.steps)
    state = create_state(model, tx, config.train.seed, config.data.seq_len)
    state = state.replace(params=params, opt_state=tx.init(params))
    ckpt.save(0, state, None, config.to_dict())
    ckpt.close()
    common.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    print(f"imported {hf_dir} ({convert.architecture(cfg).model_type}) into {workdir}")


def main(argv):
    if _HF_DIR.value and _TO_HF.value:
        raise ValueError("give either --hf_dir (import) or --to_hf (export), not both")
    if _HF_DIR.value:
        if not os.path.isdir(_HF_DIR.value):
            raise FileNotFoundError(f"--hf_dir={_HF_DIR.value} is not a directory")
        import_hf(_HF_DIR.value, _WORKDIR.value, _CONFIG.value)
    elif _TO_HF.value:
        config, _, params = common.load_run(_WORKDIR.value)
        convert.to_hf(model_config(config), params, _TO_HF.value)
        print(f"exported {_WORKDIR.value} to {_TO_HF.value}")
    else:
        raise ValueError("give --hf_dir=DIR (import into --workdir) or --to_hf=DIR (export from --workdir)")


if __name__ == "__main__":
    common.run_program(main)
