"""experiments.convert: a Hugging Face checkpoint becomes a run that trains, and goes back."""
import json
import shutil

import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from tests.helpers import run


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    path = tmp_path_factory.mktemp("hf")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_import_train_export(hf_dir, tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "hf_out"
    imported = run("experiments.convert", f"--hf_dir={hf_dir}", f"--workdir={workdir}",
                   "--config=configs/gpt2.py:tiny")
    assert imported.returncode == 0, imported.stderr[-2000:]
    config = json.load(open(workdir / "config.json"))
    assert (config["model"]["vocab_size"], config["model"]["max_len"], config["model"]["d_model"]) == (257, 64, 32)

    exported = run("experiments.convert", f"--workdir={workdir}", f"--to_hf={out}")
    assert exported.returncode == 0, exported.stderr[-2000:]
    original = safetensors.numpy.load_file(hf_dir / "model.safetensors")
    roundtrip = safetensors.numpy.load_file(out / "model.safetensors")
    for name, tensor in roundtrip.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)

    again = run("experiments.convert", f"--hf_dir={hf_dir}", f"--workdir={workdir}")
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr

    trained = run("experiments.train", "--config=configs/gpt2.py:tiny", f"--workdir={workdir}",
                  "--config.model.vocab_size=257", "--config.model.max_len=64", "--config.model.d_model=32",
                  "--config.model.d_ff=128", "--config.data.seq_len=64", "--config.train.steps=3",
                  "--config.train.eval_steps=1", "--config.train.peak_flops=1e9",
                  f"--config.data.data_dir={tmp_path / 'data'}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "resuming from step 0" in trained.stdout


# GPT-1's BPE format by hand: each character alone and ending a word ("</w>"), then merges.
_CHARS = "abcdefghijklmnopqrstuvwxyz.,!"
_MERGES = ("t h", "th e</w>", "a t</w>", "c at</w>", "s at</w>", "m at</w>", "o n</w>", "d o",
           "do g</w>", "r a", "ra n</w>", "i n</w>", "p a", "pa r", "par k</w>", "a n", "an d</w>")


@pytest.fixture(scope="module")
def openai_gpt_dir(tmp_path_factory):
    """A tiny openai-gpt checkpoint with its own tokenizer, as HF saves one: vocab.json and
    merges.txt written by hand (no end-of-text, like GPT-1's), tokenizer.json by HF's
    OpenAIGPTTokenizerFast. Returns (directory, HF's Python OpenAIGPTTokenizer read from
    vocab.json + merges.txt: the reference for the ids)."""
    path = tmp_path_factory.mktemp("openai-gpt")
    symbols = [*_CHARS, *(c + "</w>" for c in _CHARS), *(m.replace(" ", "") for m in _MERGES), "<unk>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(symbols)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    reference = transformers.OpenAIGPTTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    transformers.OpenAIGPTTokenizerFast.from_pretrained(path).save_pretrained(path)
    assert (path / "tokenizer.json").is_file()
    torch.manual_seed(0)
    config = transformers.OpenAIGPTConfig(vocab_size=len(symbols), n_positions=32, n_embd=32,
                                          n_layer=2, n_head=4)
    transformers.OpenAIGPTLMHeadModel(config).save_pretrained(path)
    return path, reference


def test_openai_gpt_tokenizer_is_the_checkpoints(openai_gpt_dir):
    from gpt.data.tokenizers import EOT, hf_tokenizer

    path, reference = openai_gpt_dir
    tok = hf_tokenizer(str(path))
    text = "The dog sat in the park, and cats ran! Then a cat sat on the mat?"
    ids = reference(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text) / 2 and reference.unk_token_id in ids  # merges and "?" unknown
    assert tok.encode(text).tolist() == ids
    assert tok.eot_id == len(reference) and tok.vocab_size == len(reference) + 1  # GPT-1 had no end of text
    ids = np.concatenate([tok.encode("the cat"), [tok.eot_id], tok.encode("a dog")])
    assert tok.decode(ids) == f"the cat{EOT}a dog"


@pytest.fixture(scope="module")
def imported_gpt1(openai_gpt_dir, tmp_path_factory):
    """The openai-gpt checkpoint imported: its table grows by the end-of-text row."""
    path, reference = openai_gpt_dir
    workdir = tmp_path_factory.mktemp("imported")
    imported = run("experiments.convert", f"--hf_dir={path}", f"--workdir={workdir}")
    assert imported.returncode == 0, imported.stderr[-2000:]
    config = json.load(open(workdir / "config.json"))
    assert config["data"]["tokenizer"] == f"hf:{path}"
    assert config["model"]["vocab_size"] == len(reference) + 1
    return workdir


def test_imported_gpt1_evaluates_and_samples(imported_gpt1, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                             ["the cat sat on the mat.", "a dog ran in the park!"]))
    evaluated = run("experiments.evaluate", f"--workdir={imported_gpt1}", f"--dataset={texts}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    loss = json.loads(evaluated.stdout)["loss"]
    assert np.isfinite(loss) and 0 < loss < 2 * np.log(77), evaluated.stdout  # near log(vocab): random
    sampled = run("experiments.sample", f"--workdir={imported_gpt1}", "--prompt=the cat",
                  "--max_new_tokens=8", "--num_samples=2")
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert sampled.stdout.startswith("=" * 20 + " sample 1")


def test_imported_gpt1_continues_pretraining(openai_gpt_dir, imported_gpt1, tmp_path):
    path, _ = openai_gpt_dir
    trained = run("experiments.train", "--config=configs/gpt1.py", f"--workdir={imported_gpt1}",
                  "--config.model.vocab_size=77", "--config.model.max_len=32",
                  "--config.model.n_layer=2", "--config.model.d_model=32", "--config.model.d_ff=128",
                  "--config.model.n_head=4", f"--config.data.tokenizer=hf:{path}",
                  "--config.data.seq_len=32", "--config.train.epochs=0",
                  "--config.train.steps=2", "--config.train.eval_steps=1",
                  "--config.train.peak_flops=1e9", f"--config.data.data_dir={tmp_path / 'data'}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "resuming from step 0" in trained.stdout
    last = [json.loads(line) for line in open(imported_gpt1 / "metrics.jsonl")][-1]
    assert last["step"] == 2 and np.isfinite(last["train/loss"]) and np.isfinite(last["eval/loss"])


def test_tokenizer_larger_than_the_table_is_refused(scanned_run, tmp_path):
    """An id without an embedding row would read NaN: programs refuse such a run up front."""
    workdir = tmp_path / "run"
    shutil.copytree(scanned_run[0], workdir)
    config = json.load(open(workdir / "config.json"))
    config["data"]["tokenizer"] = "gpt2"  # 50,257 ids for a 257-row table
    (workdir / "config.json").write_text(json.dumps(config))
    sampled = run("experiments.sample", f"--workdir={workdir}", "--max_new_tokens=2")
    assert sampled.returncode == 2 and "Traceback" not in sampled.stderr, sampled.stderr[-2000:]
    assert sampled.stderr.startswith("error: model.vocab_size=257 is not allowed: at least "
                                     "data.tokenizer=gpt2's 50257 ids"), sampled.stderr


def test_openai_gpt_import_then_finetune(openai_gpt_dir, imported_gpt1, tmp_path):
    """GPT-1's path: OpenAI's weights and tokenizer in, then fine-tuning on a task."""
    workdir = imported_gpt1
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
    last = [json.loads(line) for line in open(tmp_path / "tuned" / "metrics.jsonl")][-1]
    assert np.isfinite(last["train/loss"]) and np.isfinite(last["eval/loss"]), last


@pytest.fixture(scope="module")
def scanned_run(hf_dir, tmp_path_factory):
    """hf_dir imported into a scan_layers run (bytes tokenizer), and that run exported."""
    workdir, out = tmp_path_factory.mktemp("scanned"), tmp_path_factory.mktemp("scanned_hf")
    imported = run("experiments.convert", f"--hf_dir={hf_dir}", f"--workdir={workdir}",
                   "--config=configs/gpt2.py:tiny", "--config.model.scan_layers=true")
    assert imported.returncode == 0, imported.stderr[-2000:]
    exported = run("experiments.convert", f"--workdir={workdir}", f"--to_hf={out}")
    assert exported.returncode == 0, exported.stderr[-2000:]
    return workdir, out, exported.stdout


def test_scan_layers_run_imports_and_exports(hf_dir, scanned_run):
    workdir, out, _ = scanned_run
    assert json.load(open(workdir / "config.json"))["model"]["scan_layers"] is True
    original = safetensors.numpy.load_file(hf_dir / "model.safetensors")
    roundtrip = safetensors.numpy.load_file(out / "model.safetensors")
    assert roundtrip.keys() == original.keys()
    for name, tensor in roundtrip.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)


def test_unreadable_checkpoint_is_one_error_line(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a download cut short
    truncated = run("experiments.convert", f"--hf_dir={broken}", f"--workdir={tmp_path / 'a'}")
    (broken / "config.json").write_text("[]")
    listed = run("experiments.convert", f"--hf_dir={broken}", f"--workdir={tmp_path / 'b'}")
    for result, what in ((truncated, "model.safetensors: not a readable safetensors file"),
                         (listed, "config.json: expected a JSON object")):
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
        assert result.stderr.startswith(f"error: {broken}/{what}"), result.stderr


def _corpus(directory):
    directory.mkdir()
    for i in range(12):
        paragraphs = [f"Part {j} of {i}: " + "the cat sat on the mat, and a dog ran in the park. " * 5
                      for j in range(3)]  # and a short last one: the validation text
        (directory / f"doc{i}.txt").write_text("\n\n".join(paragraphs + [f"The end of {i}."]))
    return directory


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2", "bpe", "hf"])
def test_export_keeps_tokenizer_and_run(tokenizer, scanned_run, imported_gpt1, tmp_path):
    """Export -> import without --config gives the same run: config, tokenizer, samples; the
    exported tokenizer files are HF's formats, read by HF's own classes as ours reads them."""
    from configs import gpt2
    from gpt import data

    out, again = tmp_path / "exported", tmp_path / "again"
    if tokenizer == "bytes":
        original, out, said = scanned_run
    elif tokenizer == "hf":
        original = imported_gpt1
    else:
        config = gpt2.get_config("tiny")
        config.data.tokenizer, config.data.bpe_merges = tokenizer, 40
        config.data.name, config.data.data_dir = f"text:{_corpus(tmp_path / 'text')}", str(tmp_path / "data")
        vocab_size = data.get_tokenizer(config.data).vocab_size  # a BPE is learned here, once
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "hf")
        original = tmp_path / "original"
        overrides = [f"--config.data.{key}={config.data[key]}"
                     for key in ("tokenizer", "bpe_merges", "name", "data_dir")]
        imported = run("experiments.convert", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={original}",
                       "--config=configs/gpt2.py:tiny", *overrides)
        assert imported.returncode == 0, imported.stderr[-2000:]
    if tokenizer != "bytes":
        exported = run("experiments.convert", f"--workdir={original}", f"--to_hf={out}")
        assert exported.returncode == 0, exported.stderr[-2000:]
        said = exported.stdout
    reimported = run("experiments.convert", f"--hf_dir={out}", f"--workdir={again}")
    assert reimported.returncode == 0, reimported.stderr[-2000:]

    before, after = (json.load(open(w / "config.json")) for w in (original, again))
    if tokenizer == "hf":  # the export holds GPT-1's tokenizer files: the run reads them there
        assert after["data"]["tokenizer"] == f"hf:{out}"
        before["data"]["tokenizer"] = after["data"]["tokenizer"]
    assert after == before
    samples = [run("experiments.sample", f"--workdir={w}", "--prompt=the cat", "--max_new_tokens=12",
                   "--seed=3") for w in (original, again)]
    assert samples[0].returncode == 0, samples[0].stderr[-2000:]
    assert samples[0].stdout == samples[1].stdout and len(samples[0].stdout) > len("the cat\n")

    ours = data.get_tokenizer(ml_collections.ConfigDict(after["data"]))
    text = "The cat sat, and a dog ran in the park!"
    if tokenizer == "bytes":
        assert not any((out / name).exists() for name in ("tokenizer.json", "vocab.json"))
        assert "none written" in said
    else:
        files = {"gpt2": {"vocab.json", "merges.txt"}, "bpe": {"tokenizer.json"},
                 "hf": {"tokenizer.json", "vocab.json", "merges.txt"}}[tokenizer]
        assert files <= {p.name for p in out.iterdir()}
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text).tolist()
