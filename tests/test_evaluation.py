"""Perplexity, bits per byte and LAMBADA against the same quantities computed one token at a
time with the plain forward pass; the sample and evaluate programs on a tiny trained run."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt import evaluation
from gpt.data import tokenizers
from gpt.config import GPTConfig
from gpt.model import GPT
from tests import zero_shot_files
from tests.helpers import start

TINY = GPTConfig(vocab_size=257, max_len=16, n_layer=2, d_model=32, n_head=4, d_ff=64,
                 embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
BYTES = tokenizers.bytes_tokenizer()
TEXTS = ["Nested functions see the names of the enclosing scope, read-only.",
         "Café: 4 bytes for 3 characters.", "", "x"]
BATCH_TOKENS = 64  # the same batch shape in every test: one compilation


@pytest.fixture(scope="module")
def tiny():
    """A random model drawn by NumPy (compiling JAX's RNG is slow on CPU)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(GPT(TINY).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype),
                                    shapes["params"])
    return GPT(TINY), params


def _last_logits(model, params, contexts):
    """The plain forward pass's logits after each context (right-padded to the window:
    causal, so the padding is unseen), in float64. Rows are padded to 128: one compilation."""
    inputs = np.zeros((-(-len(contexts) // 128) * 128, TINY.max_len), np.int32)
    for i, context in enumerate(contexts):
        inputs[i, :len(context)] = context
    logits = np.asarray(jax.jit(model.apply)({"params": params}, inputs), np.float64)
    return logits[np.arange(len(contexts)), [len(c) - 1 for c in contexts]]


def _log_probs(model, params, contexts, targets):
    """log p(target | context), one context per row, and whether target is the argmax."""
    logits = _last_logits(model, params, contexts)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    rows = np.arange(len(targets))
    return logp[rows, targets], logits.argmax(-1) == np.asarray(targets)


@pytest.mark.parametrize("n, context, stride", [
    (0, 4, 4), (3, 4, 4), (4, 4, 4), (5, 4, 4), (37, 8, 8), (37, 8, 3), (37, 8, 1), (9, 9, 2)])
def test_sliding_windows_score_every_prediction_once(n, context, stride):
    windows = evaluation.sliding_windows(n, context, stride)
    scored = [p for _, end, first in windows for p in range(first, end)]
    assert scored == list(range(n))
    for begin, end, first in windows:
        assert begin <= first < end and end - begin <= context
        assert begin % stride == 0
    if stride == 1:  # every prediction sees the whole window, or everything before it
        for begin, end, first in windows:
            assert all(p - begin + 1 == min(p + 1, context) for p in range(first, end))


def test_sliding_windows_reject_a_stride_that_skips():
    with pytest.raises(ValueError, match="stride"):
        evaluation.sliding_windows(10, 4, 5)


@pytest.mark.parametrize("stride", [None, 5, 1])
def test_perplexity_is_the_per_token_loop(tiny, stride):
    """Disjoint windows: position p reads from (p // C) * C; stride 1: the last C tokens.
    Stride 5 is checked against the window rule: from the start of its scoring window."""
    model, params = tiny
    C = TINY.max_len
    contexts, targets, n_bytes = [], [], 0
    for text in TEXTS:
        tokens = [BYTES.eot_id, *BYTES.encode(text).tolist()]
        n_bytes += len(text.encode("utf-8"))
        begins = {p: b for b, e, f in evaluation.sliding_windows(len(tokens) - 1, C, stride or C)
                  for p in range(f, e)}
        for p in range(len(tokens) - 1):
            begin = {None: p // C * C, 1: max(0, p - C + 1)}.get(stride, begins[p])
            contexts.append(tokens[begin:p + 1])
            targets.append(tokens[p + 1])
    logp, _ = _log_probs(model, params, contexts, targets)
    result = evaluation.perplexity(model, params, BYTES, TEXTS, stride=stride,
                                   batch_tokens=BATCH_TOKENS)
    assert result["tokens"] == len(targets) == n_bytes  # bytes: one token per byte
    assert result["bytes"] == n_bytes
    np.testing.assert_allclose(result["loss"], -logp.mean(), rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], math.exp(-logp.mean()), rtol=1e-5)
    np.testing.assert_allclose(result["bits_per_byte"], -logp.sum() / math.log(2) / n_bytes, rtol=1e-5)


def test_split_last_word():
    assert evaluation.split_last_word("he said , `` go home '' to jack\n") == (
        "he said , `` go home '' to", " jack")
    for bad in ("single", " ", ""):
        with pytest.raises(ValueError, match="last word"):
            evaluation.split_last_word(bad)


@pytest.mark.parametrize("context_len", [None, 8])
def test_lambada_is_the_per_token_loop(tiny, context_len):
    """Synthetic passages; the longer ones lose their oldest tokens to the window."""
    model, params = tiny
    passages = ["the cat sat on the mat", "a b c d", "we went to the old mill and saw it\n",
                "ab cd"]
    rows = []
    for passage in passages:
        context, target = passage.strip().rsplit(" ", 1)
        tokens = [BYTES.eot_id, *BYTES.encode(context).tolist(), *BYTES.encode(" " + target).tolist()]
        tokens = tokens[-((context_len or TINY.max_len) + 1):]
        n = len(target) + 1
        rows.append([(tokens[:len(tokens) - n + i], tokens[len(tokens) - n + i]) for i in range(n)])
    flat = [pair for row in rows for pair in row]
    logp, correct = _log_probs(model, params, [c for c, _ in flat], [t for _, t in flat])
    splits = np.cumsum([len(row) for row in rows])[:-1]
    nats = [-lp.sum() for lp in np.split(logp, splits)]
    hits = np.split(correct, splits)
    result = evaluation.lambada(model, params, BYTES, passages, context_len=context_len,
                                batch_tokens=BATCH_TOKENS)
    assert result["examples"] == 4 and result["target_tokens"] == len(flat)
    np.testing.assert_allclose(result["perplexity"], math.exp(np.mean(nats)), rtol=1e-5)
    assert result["accuracy"] == np.mean([h.all() for h in hits])
    assert result["last_token_accuracy"] == np.mean([h[-1] for h in hits])


def test_last_word_accuracy_needs_every_token(tiny):
    """Targets built from the model's own greedy continuation are right; change the last
    token and the word is wrong, both by word and by last token."""
    model, params = tiny
    context = BYTES.encode("for x in").tolist()
    greedy = []
    for _ in range(3):
        greedy.append(int(_last_logits(model, params, [context + greedy])[0].argmax()))
    wrong_last = greedy[:2] + [(greedy[2] + 1) % TINY.vocab_size]
    result = evaluation.last_word_metrics(
        model, params, [(context, greedy), (context, wrong_last), (context + greedy[:2], greedy[2:])],
        batch_tokens=BATCH_TOKENS)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["last_token_accuracy"] == pytest.approx(2 / 3)


# ---- both programs on a tiny trained run ------------------------------------------------

def start_quick(module, *args):
    """A program whose XLA backend optimisations are off: they cost more compile time than
    these tiny runs take."""
    return start(module, *args, xla_flags="--xla_backend_optimization_level=0")


def finish(process):
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    finish(start_quick("experiments.train", "--config=configs/gpt2.py:tiny", f"--workdir={workdir}",
                       f"--config.data.data_dir={tmp_path_factory.mktemp('data')}",
                       "--config.model.n_layer=1", "--config.model.d_model=32", "--config.model.n_head=2",
                       "--config.model.d_ff=64", "--config.model.max_len=64", "--config.data.seq_len=64",
                       "--config.data.batch_size=8", "--config.train.steps=2",
                       "--config.train.log_every=1", "--config.train.eval_every=2",
                       "--config.train.ckpt_every=2", "--config.train.eval_steps=1",
                       "--config.train.peak_flops=1e12"))
    return workdir


def test_sample_and_evaluate_programs(trained, tmp_path):
    """The runs in parallel: each is mostly start-up and compilation."""
    passages = tmp_path / "lambada_test.jsonl"  # OpenAI's format: one {"text": ...} a line
    passages.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a cat sat", "x y"]))
    document = tmp_path / "doc.txt"  # validation: the paragraph after the break at 90%
    document.write_text("The first paragraph, all of it for training. " * 5 + "\n\nThe tail.")
    data_root = tmp_path / "benchmarks"
    zero_shot_files.write(data_root)
    sample = start_quick("experiments.sample", f"--workdir={trained}", "--prompt=def f",
                         "--max_new_tokens=12", "--temperature=0", "--chunk=5")
    perplexity = start_quick("experiments.evaluate", f"--workdir={trained}", "--limit=3", "--stride=16")
    lambada = start_quick("experiments.evaluate", f"--workdir={trained}", "--task=lambada",
                          f"--dataset={passages}", "--stopword_filter")
    whole = start_quick("experiments.evaluate", f"--workdir={trained}", f"--dataset=text:{document}",
                        "--split=all")
    suite = start_quick("experiments.evaluate", f"--workdir={trained}", "--suite=gpt2_zero_shot",
                        f"--data_root={data_root}")

    text = finish(sample)
    assert text.startswith("def f") and len(text) > len("def f\n")

    metrics = json.loads(finish(perplexity))
    assert metrics == json.load(open(os.path.join(trained, "eval_pydoc_validation.json")))
    assert metrics["tokens"] == metrics["bytes"] > 0 and metrics["stride"] == 16
    assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-9)
    assert math.isclose(metrics["bits_per_byte"], metrics["loss"] / math.log(2), rel_tol=1e-9)

    metrics = json.loads(finish(lambada))
    assert metrics["examples"] == 2 and metrics["target_tokens"] == len(" sat") + len(" y")
    assert metrics["stopword_filter"] is True
    assert os.path.exists(os.path.join(trained, "eval_lambada_lambada_test.json"))

    metrics = json.loads(finish(whole))  # both parts of the document: every byte of it
    assert metrics["bytes"] == len(document.read_bytes()) and metrics["split"] == "all"

    table = finish(suite)  # printed, and written as Markdown
    assert table.rstrip("\n") == open(os.path.join(trained, "zero_shot.md")).read().rstrip("\n")
    result = json.load(open(os.path.join(trained, "zero_shot.json")))
    assert result["size"] == "small" and result["missing"] == {}
    assert table.splitlines()[0].endswith("GPT-2 117M, paper's Table 3 |")
    for label, metric, paper in [
            ("LAMBADA", "perplexity", "35.13"), ("LAMBADA", "accuracy (%), no filter", "—"),
            ("CBT-CN", "accuracy (%)", "87.65"), ("CBT-NE", "accuracy (%)", "83.40"),
            ("WikiText-2", "perplexity", "29.41"), ("PTB", "perplexity", "65.85"),
            ("enwik8", "bits per byte", "1.16"), ("text8", "bits per character", "1.17"),
            ("WikiText-103", "perplexity", "37.50"), ("1BW", "perplexity", "75.20"),
            ("HellaSwag", "acc (%)", "—"), ("HellaSwag", "acc_norm (%)", "—")]:
        assert any(line.startswith(f"| {label} | {metric} | ") and line.endswith(f" | {paper} |")
                   for line in table.splitlines()), (label, metric)


def test_suite_flags_are_checked_first(tmp_path):
    """Before anything loads: one line each, naming the flag."""
    absent = tmp_path / "absent"
    cases = {f"error: --data_root='{absent}' must be a directory": [f"--data_root={absent}"],
             "error: --suite scores its own benchmarks' test sets: drop --task, --limit":
                 [f"--data_root={tmp_path}", "--task=lambada", "--limit=3"]}
    processes = {message: start_quick("experiments.evaluate", f"--workdir={tmp_path}",
                                      "--suite=gpt2_zero_shot", *args)
                 for message, args in cases.items()}
    for message, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 2 and stdout == ""
        assert stderr.startswith(message) and len(stderr.strip().splitlines()) == 1, stderr
