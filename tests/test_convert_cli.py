"""experiments.convert: a Hugging Face checkpoint becomes a run that trains, and goes back."""
import json

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from tests.helpers import run


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


@pytest.fixture(scope="module")
def openai_gpt_dir(tmp_path_factory):
    """A tiny openai-gpt checkpoint with a GPT-1-style tokenizer, as HF saves one: BPE files
    learned on a few sentences, loaded by HF's own OpenAIGPTTokenizerFast."""
    from gpt.data import tokenizers

    path = tmp_path_factory.mktemp("openai-gpt")
    text = ["The cat sat on the mat.", "A dog ran in the park!", "Cats and dogs, mats and parks."] * 20
    bpe = tokenizers._train_bpe(text, merges=40)
    bpe.model.save(str(path))  # vocab.json, merges.txt
    vocab = json.load(open(path / "vocab.json"))  # GPT-1's vocabulary has no end of text
    kept = sorted((i, t) for t, i in vocab.items() if t != tokenizers.EOT)
    json.dump({t: n for n, (_, t) in enumerate(kept)}, open(path / "vocab.json", "w"))
    hf_tok = transformers.OpenAIGPTTokenizerFast.from_pretrained(path)
    hf_tok.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.OpenAIGPTConfig(vocab_size=len(hf_tok), n_positions=32, n_embd=32,
                                          n_layer=2, n_head=4)
    transformers.OpenAIGPTLMHeadModel(config).save_pretrained(path)
    return path, hf_tok


def test_openai_gpt_tokenizer_is_the_checkpoints(openai_gpt_dir):
    from gpt.data.tokenizers import EOT, hf_tokenizer

    path, hf_tok = openai_gpt_dir
    tok = hf_tokenizer(str(path))
    text = "The dog sat in the park, and cats ran!"
    assert tok.encode(text).tolist() == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.eot_id == len(hf_tok) and tok.vocab_size == len(hf_tok) + 1  # GPT-1 had no end of text
    ids = np.concatenate([tok.encode("the cat"), [tok.eot_id], tok.encode("a dog")])
    assert tok.decode(ids) == f"the cat{EOT}a dog"


def test_openai_gpt_import_then_finetune(openai_gpt_dir, tmp_path):
    """GPT-1's path: OpenAI's weights and tokenizer in, then fine-tuning on a task."""
    path, _ = openai_gpt_dir
    workdir = tmp_path / "imported"
    imported = run("experiments.convert", f"--hf_dir={path}", f"--workdir={workdir}")
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert json.load(open(workdir / "config.json"))["data"]["tokenizer"] == f"hf:{path}"

    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "validation"):
        with open(task / f"{split}.jsonl", "w") as f:
            for i in range(64):
                f.write(json.dumps({"text_a": "the cat sat", "text_b": "on the mat" if i % 2 else "a dog ran",
                                    "label": i % 2}) + "\n")
    tuned = run("experiments.finetune", "--config=configs/finetune/rte.py", f"--config.init_from={workdir}",
                f"--config.task.name=jsonl:{task}", "--config.task.format=entailment",
                "--config.task.num_labels=2", "--config.task.metrics=('accuracy',)",
                "--config.train.epochs=1", "--config.train.peak_flops=1e9", f"--workdir={tmp_path / 'tuned'}")
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    config = json.load(open(tmp_path / "tuned" / "config.json"))
    assert config["model"]["vocab_size"] == len(openai_gpt_dir[1]) + 4  # end of text, start, delim, extract
    assert config["model"]["norm_position"] == "post" and config["data"]["seq_len"] == 32
