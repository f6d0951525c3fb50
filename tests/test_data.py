"""The data pipeline: corpus split, tokenizers, packing, sharding, resumption."""
import collections
import json
import os
import re
import subprocess
import sys
import textwrap
from unittest import mock

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from configs.base import get_base_config
from gpt import data
from gpt.data import tokenizers
from tests.helpers import run


@pytest.fixture
def cfg(data_dir):
    c = get_base_config().data
    c.data_dir = data_dir
    c.batch_size = 4
    c.seq_len = 32
    c.bpe_merges = 500
    return c


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _stream(batches, eot_id):
    """The token stream the windows were cut from, rows in order, split into documents."""
    windows = [np.append(i, t[-1]) for b in batches for i, t in zip(b["inputs"], b["targets"])]
    stream = np.concatenate(windows)
    return np.split(stream, np.flatnonzero(stream == eot_id) + 1)


def test_split_is_disjoint_and_small(cfg):
    train = list(data.documents(cfg, "train"))
    validation = list(data.documents(cfg, "validation"))
    n_train, n_val = sum(map(len, train)), sum(map(len, validation))
    assert 0.05 <= n_val / (n_train + n_val) <= 0.10
    train_text = "\0".join(train)
    long_paragraphs = [p.strip() for doc in validation for p in doc.split("\n\n")
                       if len(p.strip()) > 10]
    assert long_paragraphs
    assert not [p for p in long_paragraphs if p in train_text]


def test_split_document_keeps_every_character():
    text = "a" * 50 + "\n\n" + "b" * 40 + "\n\n" + "c" * 9
    train, validation = data.split_document(text)
    assert train + validation == text
    assert validation == "c" * 9
    assert data.split_document("no paragraph break") == ("no paragraph break", "")


@pytest.mark.parametrize("name", ["xyz", "c4/xyz", "Bad Name!"])
def test_unknown_dataset_names_the_key(cfg, name):
    cfg.name = name
    with pytest.raises(ValueError, match=rf"^data.name='{name}' is not allowed: pydoc, text:PATH"):
        data.documents(cfg, "train")


class SmallTexts(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset with two text features and no validation split, prepared by the tests."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"title": tfds.features.Text(), "body": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 20), "test": self._generate_examples(20, 25)}

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            yield i, {"title": f"title {i}", "body": f"body of document {i}. " * 10}


def test_tfds_dataset_by_name(cfg, tmp_path):
    cfg.data_dir = str(tmp_path)
    cfg.name = "small_texts"
    tfds.builder("small_texts", data_dir=str(tmp_path), file_format="array_record") \
        .download_and_prepare()
    with pytest.raises(ValueError, match=r"data.text_feature='' is not allowed: .*title, body"):
        data.documents(cfg, "train")
    cfg.text_feature = "body"
    assert sorted(data.documents(cfg, "validation")) == sorted(  # no validation split: test
        f"body of document {i}. " * 10 for i in range(20, 25))
    assert len(data.documents(cfg, "train")) == 20
    batch = next(data.make_train_iterator(cfg, seed=0))
    assert batch["inputs"].shape == (4, 32)
    assert data.make_eval_batches(cfg, num_batches=1)


def test_tfds_mock_data_finds_the_text_feature(cfg):
    """pg19's only text feature is book_text; without a validation or test split, train's tail."""
    cfg.name = "pg19"
    with tfds.testing.mock_data(num_examples=12), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
        texts = list(data.documents(cfg, "validation"))
        assert len(texts) == 12 and all(isinstance(t, str) for t in texts)
        assert next(data.make_train_iterator(cfg, seed=0))["inputs"].shape == (4, 32)


@pytest.mark.parametrize("name,needs", [
    ("tiny_shakespeare", r"pip install tensorflow; python -c .*"),
    ("wikipedia/20230601.en", r"pip install (tensorflow )?apache-beam; .*beam_datasets"),
    ("c4/webtextlike", r"by hand, put them in .*downloads/manual \(.*OpenWebText.zip"),
])
def test_unprepared_dataset_says_how_to_prepare(cfg, tmp_path, name, needs):
    cfg.data_dir = str(tmp_path)
    cfg.name = name
    with pytest.raises(FileNotFoundError) as e:
        data.documents(cfg, "train")
    message = str(e.value)
    assert message.startswith(f"data.name={name!r}: the TFDS dataset {name} is not prepared in")
    assert "\n" not in message
    assert f"tfds.builder('{name}', data_dir='{tmp_path}')" in message
    assert "download_and_prepare(file_format='array_record')" in message
    assert re.search(needs, message)


def test_unknown_tokenizer_names_the_key(cfg):
    cfg.tokenizer = "chars"
    with pytest.raises(ValueError, match=r"data.tokenizer='chars' is not allowed"):
        data.get_tokenizer(cfg)


def test_bytes_round_trip(cfg):
    tok = data.get_tokenizer(cfg)
    text = "naïve café, 日本 <|endoftext|>"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    assert tok.decode(ids) == text
    assert tok.decode([104, 105, 256, 0xFF, 33]) == "hi<|endoftext|>\ufffd!"


def test_gpt2_matches_openai(cfg):
    cfg.tokenizer = "gpt2"
    tok = data.get_tokenizer(cfg)
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    text = "Grüße, 世界! ünïcödé 🙂 <|endoftext|>"
    ids = tok.encode(text)
    assert tok.eot_id not in ids
    assert tok.decode(ids) == text


def test_gpt2_rejects_altered_files(cfg, monkeypatch):
    cfg.tokenizer = "gpt2"
    monkeypatch.setitem(tokenizers.GPT2_FILES, "vocab.bpe", "0" * 64)
    tokenizers.gpt2_tokenizer.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"vocab.bpe has sha256 1ce16647.*expected 0000"):
            data.get_tokenizer(cfg)
    finally:
        tokenizers.gpt2_tokenizer.cache_clear()


def test_bpe_learns_once_and_round_trips(cfg, monkeypatch):
    cfg.tokenizer = "bpe"
    tok = data.get_tokenizer(cfg)
    sentence = "the try statement specifies exception handlers, and cleanup code."
    ids = tok.encode(sentence)
    assert ids.max() < tok.vocab_size and tok.eot_id not in ids
    assert len(ids) < len(sentence) / 3  # merges made pieces of words, not letters
    assert "".join(tok.decode(ids).split()) == "".join(sentence.split())
    assert "".join(tok.decode(tok.encode("The TRY Statement")).split()) == "thetrystatement"
    assert tok.eot_id not in tok.encode("<|endoftext|>")

    def no_training(*args):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(tokenizers, "_train_bpe", no_training)
    again = data.get_tokenizer(cfg)
    assert again.vocab_size == tok.vocab_size
    assert again.encode(sentence).tolist() == ids.tolist()


def test_bpe_learns_from_the_first_characters(cfg, monkeypatch):
    """A cap learns from train's first documents only, under its own file, the same each time."""
    cfg.tokenizer, cfg.bpe_train_chars = "bpe", 20_000
    train = list(data.documents(cfg, "train"))
    seen, said, learn = [], [], tokenizers._train_bpe

    def recording(texts, merges, progress):
        seen.append(list(texts))
        return learn(texts, merges, progress)

    monkeypatch.setattr(tokenizers, "_train_bpe", recording)
    capped = data.get_tokenizer(cfg, progress=said.append)
    assert "".join(seen[0]) == "".join(train)[:20_000]
    assert seen[0][:-1] == train[:len(seen[0]) - 1] and len(seen[0]) < len(train)
    assert len(said) == 1 and said[0].startswith("learning 500 BPE merges from the first 20,000 ")
    path = os.path.join(cfg.data_dir, "tokenizers", f"{capped.name}.json")
    assert capped.name.endswith("-bpe500-20000chars")
    learned = open(path).read()
    os.remove(path)
    data.get_tokenizer(cfg)
    assert open(path).read() == learned
    cfg.bpe_train_chars = 0  # all of train: another file, another vocabulary
    whole = data.get_tokenizer(cfg)
    assert "".join(seen[-1]) == "".join(train)
    assert open(os.path.join(cfg.data_dir, "tokenizers", f"{whole.name}.json")).read() != learned


def _many_characters_corpus(directory, n_chars=1200, frequent=240):
    """Text of n_chars distinct CJK characters: the first `frequent` with distinct counts
    (300, 299, ...), the rest once each, shuffled into words of 1-6 characters, in 8 files."""
    rng = np.random.default_rng(0)
    chars = [chr(0x4E00 + k) for k in range(n_chars)]
    pool = [c for k, c in enumerate(chars) for _ in range(300 - k if k < frequent else 1)]
    pool = list(rng.permutation(pool))
    words = []
    while pool:
        n = int(rng.integers(1, 7))
        words.append("".join(pool[:n]))
        pool = pool[n:]
    os.makedirs(directory, exist_ok=True)
    for i, part in enumerate(np.array_split(np.array(words, dtype=object), 8)):
        with open(os.path.join(directory, f"doc{i}.txt"), "w") as f:  # paragraphs of 40 words
            f.write("\n\n".join(" ".join(part[j:j + 40]) for j in range(0, len(part), 40)))
    return chars


def test_bpe_has_gpt1s_vocabulary_on_any_corpus(cfg, tmp_path):
    """478 base symbols (end-of-text, <unk>, the 238 most frequent characters alone and
    ending a word) + bpe_merges, however many characters the corpus has; rarer ones <unk>."""
    chars = _many_characters_corpus(tmp_path / "cjk")
    cfg.name, cfg.tokenizer, cfg.bpe_merges = f"text:{tmp_path / 'cjk'}", "bpe", 60
    counts = collections.Counter("".join("".join(data.documents(cfg, "train")).split()))
    assert len(counts) > 1000
    ranked = sorted(counts, key=lambda c: (-counts[c], c))  # ties: the lower code point first
    tok = data.get_tokenizer(cfg)
    assert tok.vocab_size == 478 + 60 and tok.eot_id < tok.vocab_size
    learned = json.load(open(os.path.join(cfg.data_dir, "tokenizers", f"{tok.name}.json")))
    vocab = learned["model"]["vocab"]
    assert len(vocab) == tok.vocab_size and len(learned["model"]["merges"]) == 60
    assert {c for c in ranked[:238]} | {c + "</w>" for c in ranked[:238]} <= set(vocab)
    unk = vocab["<unk>"]
    for rare in ranked[238:248]:
        assert tok.encode(rare).tolist() == [unk]
    assert tok.encode(ranked[0]).tolist() == [vocab[ranked[0] + "</w>"]]
    assert set(chars) >= set(counts)


def test_bpe_short_of_merges_warns_and_names_what_it_learned(cfg, tmp_path, monkeypatch):
    os.makedirs(tmp_path / "small")
    (tmp_path / "small" / "a.txt").write_text(
        "\n\n".join("abc abd abe! bcd bce " * 5 + "x" * i for i in range(1, 21)))
    cfg.name, cfg.tokenizer, cfg.bpe_merges = f"text:{tmp_path / 'small'}", "bpe", 5000
    said = []
    tok = data.get_tokenizer(cfg, progress=said.append)
    file = os.path.join(cfg.data_dir, "tokenizers", f"{tok.name}.json")
    merges = json.load(open(file))["model"]["merges"]
    assert 0 < len(merges) < 5000 and f"-bpe{len(merges)}-" in tok.name
    assert said[-1] == (f"warning: text:{tmp_path / 'small'}'s train text supports only "
                        f"{len(merges)} merges, a vocabulary of {tok.vocab_size} ids, not the "
                        f"5,478 of data.bpe_merges=5,000; learned into {file}")
    asked = os.path.join(cfg.data_dir, "tokenizers", tok.name.replace(f"-bpe{len(merges)}-", "-bpe5000-") + ".json")
    assert os.path.realpath(asked) == file
    monkeypatch.setattr(tokenizers, "_train_bpe", None)  # the next run reads the file, and says so
    said.clear()
    again = data.get_tokenizer(cfg, progress=said.append)
    assert (again.name, again.vocab_size) == (tok.name, tok.vocab_size) and said[0].startswith("warning:")


def test_gpt1_config_trains_on_many_characters_with_its_vocabulary(tmp_path):
    _many_characters_corpus(tmp_path / "cjk")
    workdir = tmp_path / "run"
    result = run("experiments.train", "--config=configs/gpt1.py", f"--workdir={workdir}",
                 f"--config.data.name=text:{tmp_path / 'cjk'}", f"--config.data.data_dir={tmp_path / 'data'}",
                 "--config.data.bpe_merges=60", "--config.model.n_layer=1", "--config.model.d_model=32",
                 "--config.model.n_head=2", "--config.model.d_ff=128", "--config.model.max_len=16",
                 "--config.data.seq_len=16", "--config.data.batch_size=4", "--config.train.epochs=0",
                 "--config.train.steps=2", "--config.train.eval_steps=1", "--config.train.peak_flops=1e9")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.load(open(workdir / "config.json"))["model"]["vocab_size"] == 478 + 60
    wte = 538 * 32
    assert f"{wte + 16 * 32 + 12 * 32 * 32 + 9 * 32 + 4 * 32:,} parameters" in result.stdout


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2", "bpe"])
def test_train_batches_are_shifted_windows(cfg, tokenizer):
    cfg.tokenizer = tokenizer
    tok = data.get_tokenizer(cfg)
    for batch in _take(data.make_train_iterator(cfg, seed=0), 3):
        assert set(batch) == {"inputs", "targets"}
        for x in batch.values():
            assert x.shape == (4, 32) and x.dtype == np.int32
            assert 0 <= x.min() and x.max() < tok.vocab_size
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_train_stream_is_whole_documents(cfg):
    """Packing only concatenates and cuts: between end-of-text ids lie whole train documents."""
    cfg.seq_len = 1024
    tok = data.get_tokenizer(cfg)
    train = set(data.documents(cfg, "train"))
    docs = _stream(_take(data.make_train_iterator(cfg, seed=0), 30), tok.eot_id)[1:-1]
    assert len(docs) > 3
    assert all(tok.decode(d[:-1]) in train for d in docs)


def test_seed_changes_order(cfg):
    a = next(data.make_train_iterator(cfg, seed=0))["inputs"]
    b = next(data.make_train_iterator(cfg, seed=1))["inputs"]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("seq_len,skip", [(32, 3), (1024, 90)])  # 90 x 4 x 1025 > one epoch
def test_resume_from_state_is_exact(cfg, seq_len, skip):
    cfg.seq_len = seq_len
    it = data.make_train_iterator(cfg, seed=3)
    _take(it, skip)
    state = it.get_state()
    after = _take(it, 3)
    it.set_state(state)
    resumed = _take(it, 3)
    fresh = data.make_train_iterator(cfg, seed=3)
    fresh.set_state(state)
    for a, b, c in zip(after, resumed, _take(fresh, 3)):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], c["targets"])


def test_orbax_checkpoints_the_iterator(cfg, tmp_path):
    it = data.make_train_iterator(cfg, seed=0)
    _take(it, 5)
    manager = ocp.CheckpointManager(tmp_path)
    manager.save(5, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    after = _take(it, 3)
    restored = data.make_train_iterator(cfg, seed=0)
    manager.restore(5, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(restored)))
    for a, b in zip(after, _take(restored, 3)):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_workers_make_the_same_batches_and_resume(cfg, tmp_path):
    """Two tokenizing processes give the batches of one, and a checkpoint of theirs resumes them."""
    cfg.tokenizer, cfg.seq_len = "bpe", 512  # 12 batches span ~20 documents
    expected = _take(data.make_train_iterator(cfg, seed=3), 12)
    cfg.num_workers = 2
    it = data.make_train_iterator(cfg, seed=3)
    batches = _take(it, 6)
    manager = ocp.CheckpointManager(tmp_path)
    manager.save(6, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    batches += _take(it, 6)
    it.close()
    restored = data.make_train_iterator(cfg, seed=3)
    manager.restore(6, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(restored)))
    batches += _take(restored, 6)
    restored.close()
    for a, b in zip(expected + expected[6:], batches):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


@pytest.mark.parametrize("key", ["num_workers", "prefetch"])
def test_worker_and_prefetch_counts_are_checked(cfg, key):
    cfg[key] = -1
    with pytest.raises(ValueError, match=rf"data.{key}=-1 is not allowed: a non-negative"):
        data.make_train_iterator(cfg, seed=0)


def test_batch_size_must_divide(cfg):
    with pytest.raises(ValueError, match="data.batch_size=4 is not allowed: a multiple of the 3"):
        data.make_train_iterator(cfg, seed=0, process_count=3)


def test_eval_batches_are_fixed_and_split_across_hosts(cfg):
    tok = data.get_tokenizer(cfg)
    first = data.make_eval_batches(cfg, num_batches=5)
    assert len(first) == 5
    for a, b in zip(first, data.make_eval_batches(cfg, num_batches=5)):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    halves = [data.make_eval_batches(cfg, num_batches=5, process_index=i, process_count=2)
              for i in range(2)]
    for whole, h0, h1 in zip(first, *halves):
        np.testing.assert_array_equal(whole["targets"], np.concatenate([h0["targets"],
                                                                        h1["targets"]]))
    # Unshuffled, unpadded: the stream is the validation documents in order.
    validation = [tok.encode(t).tolist() + [tok.eot_id] for t in data.documents(cfg, "validation")]
    expected = np.concatenate(validation)
    stream = np.concatenate(_stream(first, tok.eot_id))
    np.testing.assert_array_equal(stream, expected[:len(stream)])


def test_eval_returns_what_there_is(cfg):
    everything = data.make_eval_batches(cfg, num_batches=10**6)
    windows = len(everything) * cfg.batch_size
    assert windows == data.count_tokens(cfg, "validation") // (cfg.seq_len + 1) // 4 * 4
    # Less than one global batch: the one batch is every window, cut to whole eval micro-batches.
    cfg.seq_len = data.count_tokens(cfg, "validation") // 10 - 1  # 10 windows
    first_rows = np.concatenate([b["inputs"] for b in data.make_eval_batches(cfg, num_batches=2)])
    cfg.batch_size = 64
    (short,) = data.make_eval_batches(cfg, num_batches=3, micro_batch_rows=4)
    np.testing.assert_array_equal(short["inputs"], first_rows)
    halves = [data.make_eval_batches(cfg, num_batches=3, micro_batch_rows=4, process_index=i, process_count=2)
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h[0]["inputs"] for h in halves]), first_rows)
    with pytest.raises(ValueError, match=r"data.name='pydoc' is not allowed: .* at least 16 windows of "
                                         rf"data.seq_len \+ 1 = {cfg.seq_len + 1} tokens"):
        data.make_eval_batches(cfg, num_batches=1, micro_batch_rows=16)


def test_token_counts_and_unigram_entropy(cfg):
    train = list(data.documents(cfg, "train"))
    assert data.count_tokens(cfg, "train") == sum(len(t.encode()) for t in train) + len(train)
    entropy = data.unigram_entropy(cfg)
    assert 2.0 < entropy < np.log(257)


def _write_corpus(directory, n=40):
    """n .txt documents of three long paragraphs and a short last one (validation), and a
    .jsonl of n one-line documents."""
    os.makedirs(directory, exist_ok=True)
    for i in range(n):
        paragraphs = [f"text {i} part {j}: " + " ".join(f"w{i * 7 + j * k}" for k in range(12))
                      for j in range(3)] + [f"end of text {i}."]
        with open(os.path.join(directory, f"doc{i:02d}.txt"), "w") as f:
            f.write("\n\n".join(paragraphs))
    with open(os.path.join(directory, "lines.jsonl"), "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"line {i}: short document number {i}.", "id": i}) + "\n")
        f.write("\n")  # blank lines are skipped


@pytest.fixture
def local(cfg, tmp_path):
    _write_corpus(tmp_path / "corpus")
    cfg.name = f"text:{tmp_path / 'corpus'}"
    return cfg


def test_local_text_files_and_jsonl(local, tmp_path):
    root = tmp_path / "corpus"
    train, validation = (list(data.documents(local, s)) for s in ("train", "validation"))
    assert sorted(t for t in validation if t.startswith("end")) == sorted(
        f"end of text {i}." for i in range(40))
    lines = [t for t in train + validation if t.startswith("line ")]
    assert sorted(lines) == sorted(f"line {i}: short document number {i}." for i in range(40))
    assert 0 < len([t for t in validation if t.startswith("line ")]) < 10  # whole, 1 in 10
    assert sum(t.startswith("text ") for t in train) == 40
    local.name = f"text:{root}/doc0*.txt, {root / 'lines.jsonl'}"
    assert len(data.documents(local, "train")) == 10 + len(
        [t for t in train if t.startswith("line ")])
    assert next(data.make_train_iterator(local, seed=0))["inputs"].shape == (4, 32)


def test_local_text_edited_is_prepared_again(local, tmp_path):
    said = []
    data.corpus.prepare(local, progress=said.append)
    data.corpus.prepare(local, progress=said.append)  # prepared: reused without a word
    first = data.corpus.corpus_id(local)
    (tmp_path / "corpus" / "doc00.txt").write_text("edited " * 20 + "\n\nthe end")
    assert data.corpus.corpus_id(local) != first
    data.corpus.prepare(local, progress=said.append)
    assert [line.split(" in ")[0] for line in said] == [f"preparing {local.name}"] * 2
    assert "edited " * 20 + "\n\n" in list(data.documents(local, "train"))


@pytest.mark.parametrize("file,content,error", [
    ("missing.txt", None, r"'\S*missing.txt' is no .txt or .jsonl file, nor a directory or glob"),
    ("empty.txt", "  \n\n", r"empty.txt is empty"),
    ("bad.jsonl", '{"body": "x"}\n', r"bad.jsonl:1 is not a JSON object with a string \"text\""),
    ("notes.md", "# notes", r"notes.md is neither .txt nor .jsonl"),
    ("short.txt", "one paragraph only", r"leaves nothing for validation"),
    # no paragraph break, and its sha256 is 0 modulo 10: the one document goes whole to validation
    ("held_out.txt", "a single line document number 1 without a paragraph break",
     r"leaves nothing for train"),
])
def test_local_text_errors_name_the_path(cfg, tmp_path, file, content, error):
    if content is not None:
        (tmp_path / file).write_text(content)
    cfg.name = f"text:{tmp_path / file}"
    with pytest.raises((ValueError, FileNotFoundError), match=rf"^data.name='text:.*{error}"):
        data.documents(cfg, "train")


def test_hosts_shards_are_disjoint_and_cover_train(local):
    """Document-level: over two epochs each host sees whole documents, together all of train."""
    local.name += "/lines.jsonl"
    local.seq_len = 64
    tok = data.get_tokenizer(local)
    train = set(data.documents(local, "train"))
    seen = []
    for index in range(2):
        it = data.make_train_iterator(local, seed=0, process_index=index, process_count=2)
        docs = _stream(_take(it, 2 * 36 * 40 // (2 * 65) + 2), tok.eot_id)[1:-1]
        seen.append({tok.decode(d[:-1]) for d in docs})
    assert seen[0] <= train and seen[1] <= train
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == train


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_in_a_new_process(local, tmp_path, num_workers):
    local.num_workers = num_workers
    it = data.make_train_iterator(local, seed=5)
    _take(it, 7)
    (tmp_path / "state.json").write_text(json.dumps(it.get_state(), default=str))
    expected = next(it)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from configs.base import get_base_config
        from gpt import data
        cfg = get_base_config().data
        cfg.update({json.dumps(local.to_dict())})
        it = data.make_train_iterator(cfg, seed=5)
        it.set_state(json.loads(open(sys.argv[1]).read()))
        np.save(sys.argv[2], next(it)["inputs"])
    """)
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "state.json"),
                    str(tmp_path / "next.npy")], check=True, cwd=os.getcwd(),
                   env={**os.environ, "PYTHONPATH": os.getcwd()})
    np.testing.assert_array_equal(np.load(tmp_path / "next.npy"), expected["inputs"])


@pytest.mark.parametrize("tokenizer,base", [("bytes", 257), ("gpt2", 50257), ("bpe", None)])
def test_finetune_special_tokens_follow_the_vocabulary(cfg, tokenizer, base):
    cfg.tokenizer = tokenizer
    tok = data.get_tokenizer(cfg)
    ft = tok.with_special_tokens()
    base = base or tok.vocab_size
    assert ft.vocab_size == base + 3 and tok.vocab_size == base
    assert dict(ft.special_ids) == {"<|endoftext|>": tok.eot_id, "<start>": base,
                                    "<delim>": base + 1, "<extract>": base + 2}
    assert dict(tok.special_ids) == {"<|endoftext|>": tok.eot_id}
    ids = [ft.special_ids["<start>"], *ft.encode("a b"), ft.special_ids["<delim>"],
           *ft.encode("c"), ft.special_ids["<extract>"]]
    assert "".join(ft.decode(ids).split()) == "<start>ab<delim>c<extract>"
    assert ft.encode("<start>").max() < base  # text never becomes a special id
    with pytest.raises(ValueError, match="each must be new"):
        ft.with_special_tokens(["<start>"])


def test_gpt2_published_ids_and_any_unicode(cfg):
    cfg.tokenizer = "gpt2"
    tok = data.get_tokenizer(cfg)
    assert tok.encode(" the").tolist() == [262]
    assert tok.encode("Hello, world!").tolist() == [15496, 11, 995, 0]
    assert tok.encode("<|endoftext|>").tolist() == [27, 91, 437, 1659, 5239, 91, 29]
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"
    rng = np.random.default_rng(0)
    points = rng.integers(0, 0x110000, size=2000)
    text = "".join(chr(p) for p in points if not 0xD800 <= p < 0xE000)
    assert tok.decode(tok.encode(text)) == text
    raw = bytes(range(256)).decode("latin-1") + "\x00\t\r\n \u200b\ufeff"
    assert tok.decode(tok.encode(raw)) == raw
