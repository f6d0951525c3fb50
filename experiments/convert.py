"""Hugging Face checkpoints in and out of a run directory.

python -m experiments.convert --hf_dir=DIR --workdir=OUT [--config=configs/gpt2.py:small]
python -m experiments.convert --workdir=W --to_hf=DIR

The first writes OUT/config.json and a step-0 checkpoint (the imported weights, a fresh
optimizer state), so `experiments.train` continues pre-training from it and sampling,
evaluation and fine-tuning load it like any run. The HF config gives the architecture;
everything else (data, optim, train, and the model's layout: scan_layers, remat, dtype)
comes from --config, else from the run an export of ours kept in DIR/gpt_jax_run.json,
else configs/gpt2.py:small for GPT-2 and configs/gpt1.py for openai-gpt. A DIR/tokenizer.json
of an openai-gpt checkpoint becomes the run's tokenizer; GPT-1's vocabulary has no
end-of-text id, so the import appends one embedding row for it (N(0, init_std)).

The second writes config.json + model.safetensors, the tokenizer in HF's format where HF
has one (see gpt.data.tokenizers.save_hf) and gpt_jax_run.json, the run's config.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
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

RUN_CONFIG = "gpt_jax_run.json"  # an export's run config: importing the export gives the same run


def _base_config(hf_dir: str, config):
    """(config, whether it is the run an export of ours kept)."""
    if config is not None:
        return config, False
    kept = os.path.join(hf_dir, RUN_CONFIG)
    if os.path.isfile(kept):
        with open(kept) as f:
            return ml_collections.ConfigDict(json.load(f)), True
    from configs import gpt1, gpt2
    pre = convert.read_config(hf_dir).norm_position == "pre"
    return (gpt2.get_config("small") if pre else gpt1.get_config("")), False


def import_hf(hf_dir: str, workdir: str, config) -> None:
    workdir = common.prepare_workdir(workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    if ckpt.all_steps():
        raise ValueError(f"--workdir={workdir} already holds checkpoints; choose an empty directory")
    config, exported = _base_config(hf_dir, config)
    cfg, params = convert.from_hf(hf_dir, base=model_config(config))
    for key, value in vars(cfg).items():
        config.model[key] = value
    model_type = convert.architecture(cfg).model_type
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")) and (
            config.data.tokenizer.startswith(data.HF_PREFIX) if exported
            else model_type == "openai-gpt"):  # GPT-1's own BPE, not one learned here
        config.data.tokenizer = data.HF_PREFIX + os.path.abspath(hf_dir)
    config.data.seq_len = min(config.data.seq_len, cfg.max_len)
    tokenizer = data.get_tokenizer(config.data, common.to_stderr)
    if tokenizer.eot_id == cfg.vocab_size == tokenizer.vocab_size - 1:  # GPT-1's: no end of text
        cfg, params = convert.append_rows(cfg, params, 1, jax.random.key(config.train.seed))
        config.model.vocab_size = cfg.vocab_size
        print(f"appended an embedding row for end-of-text (id {tokenizer.eot_id}), which the "
              f"checkpoint's vocabulary lacks: model.vocab_size={cfg.vocab_size}")
    common.check_vocabulary(tokenizer, config)
    validate(config)
    model = GPT(model_config(config))
    tx, _ = make_optimizer(config.optim, config.train.steps)
    state = create_state(model, tx, config.train.seed, config.data.seq_len)
    state = state.replace(params=params, opt_state=tx.init(params))
    ckpt.save(0, state, None, config.to_dict())
    ckpt.close()
    common.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    print(f"imported {hf_dir} ({model_type}) into {workdir}")


def export_hf(workdir: str, out: str) -> None:
    config, _, params = common.load_run(workdir)
    data.get_tokenizer(config.data, common.to_stderr)  # refused before anything is written
    convert.to_hf(model_config(config), params, out)
    print(data.save_hf(config.data, out))
    common.write_json_atomic(os.path.join(out, RUN_CONFIG), config.to_dict())
    print(f"exported {workdir} to {out}")


def main(argv):
    if _HF_DIR.value and _TO_HF.value:
        raise ValueError("give either --hf_dir (import) or --to_hf (export), not both")
    if _HF_DIR.value:
        if not os.path.isdir(_HF_DIR.value):
            raise FileNotFoundError(f"--hf_dir={_HF_DIR.value} is not a directory")
        import_hf(_HF_DIR.value, _WORKDIR.value, _CONFIG.value)
    elif _TO_HF.value:
        export_hf(_WORKDIR.value, _TO_HF.value)
    else:
        raise ValueError("give --hf_dir=DIR (import into --workdir) or --to_hf=DIR (export from --workdir)")


if __name__ == "__main__":
    common.run_program(main)
