"""The data pipeline: corpus split, tokenizers, packing, sharding, resumption."""
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.base import get_base_config
from gpt import data
from gpt.data import tokenizers


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One prepared corpus (and learned BPE) shared by the module's tests."""
    return str(tmp_path_factory.mktemp("data"))


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


def test_unknown_corpus_names_the_key(cfg):
    cfg.name = "xyz"
    with pytest.raises(ValueError, match=r"^data.name='xyz' is not allowed: one of pydoc$"):
        data.documents(cfg, "train")


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


def test_hosts_read_disjoint_documents(cfg):
    cfg.seq_len = 1024
    tok = data.get_tokenizer(cfg)
    seen = []
    for index in range(2):
        it = data.make_train_iterator(cfg, seed=0, process_index=index, process_count=2)
        batches = _take(it, 30)
        assert batches[0]["inputs"].shape == (2, 1024)
        seen.append({tok.decode(d) for d in _stream(batches, tok.eot_id)[1:-1]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


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
    cfg.seq_len = 10**5
    with pytest.raises(ValueError, match="data.seq_len=100000 is not allowed: .*data.batch_size=4"):
        data.make_eval_batches(cfg, num_batches=1)


def test_token_counts_and_unigram_entropy(cfg):
    train = list(data.documents(cfg, "train"))
    assert data.count_tokens(cfg, "train") == sum(len(t.encode()) for t in train) + len(train)
    entropy = data.unigram_entropy(cfg)
    assert 2.0 < entropy < np.log(257)
