"""experiments.convert: a Hugging Face checkpoint becomes a run that trains, and goes back."""
import json

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from tests.test_cli import run


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    path = tmp_path_factory.mktemp("hf")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_import_train_export(hf_dir, tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "hf_out"
    imported = run("experiments.convert", f"--hf_dir={hf_dir}", f"--workdir={workdir}",
                   "--config=configs/gpt2.py:tiny")
    assert imported.returncode == 0, imported.stderr[-2000:]
    config = json.load(open(workdir / "config.json"))
    assert (config["model"]["vocab_size"], config["model"]["max_len"], config["model"]["d_model"]) == (300, 64, 32)

    exported = run("experiments.convert", f"--workdir={workdir}", f"--to_hf={out}")
    assert exported.returncode == 0, exported.stderr[-2000:]
    original = safetensors.numpy.load_file(hf_dir / "model.safetensors")
    roundtrip = safetensors.numpy.load_file(out / "model.safetensors")
    for name, tensor in roundtrip.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)

    again = run("experiments.convert", f"--hf_dir={hf_dir}", f"--workdir={workdir}")
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr

    trained = run("experiments.train", "--config=configs/gpt2.py:tiny", f"--workdir={workdir}",
                  "--config.model.vocab_size=300", "--config.model.max_len=64", "--config.model.d_model=32",
                  "--config.model.d_ff=128", "--config.data.seq_len=64", "--config.train.steps=3",
                  "--config.train.eval_steps=1", "--config.train.peak_flops=1e9",
                  f"--config.data.data_dir={tmp_path / 'data'}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "resuming from step 0" in trained.stdout
