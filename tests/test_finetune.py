"""GPT-1's fine-tuning: input transformations, the objective, the metrics, and learning
synthetic tasks from a tiny pre-trained run."""
import csv
import json
import os
import re

import jax
import numpy as np
import optax
import pytest

from configs.finetune.base import get_finetune_config
from experiments import finetune
from gpt.data.tokenizers import bytes_tokenizer
from gpt.finetune import metrics, pipeline, tasks
from gpt.finetune.model import GPTClassifier, load_pretrained, make_loss
from gpt.finetune.transforms import Example, sequences, to_arrays
from gpt.config import ConfigError, GPTConfig
from gpt.model import GPT
from gpt.optim import lr_schedule
from tests.helpers import run

TOK = bytes_tokenizer().with_special_tokens()
S, D, E = 257, 258, 259  # start, delimiter, extract after the 257 byte ids


def ids(text):
    return list(text.encode())


def test_special_tokens_follow_the_bytes():
    assert [TOK.special_ids[n] for n in ("<start>", "<delim>", "<extract>")] == [S, D, E]


@pytest.mark.parametrize("fmt,example,expected", [
    ("classification", Example(("hi",), 1), [[S, *ids("hi"), E]]),
    ("entailment", Example(("ab", "c"), 0), [[S, *ids("ab"), D, *ids("c"), E]]),
    ("similarity", Example(("ab", "c"), 0),
     [[S, *ids("ab"), D, *ids("c"), E], [S, *ids("c"), D, *ids("ab"), E]]),
    ("multiple_choice", Example(("ctx",), 1, ("x", "yz")),
     [[S, *ids("ctx"), D, *ids("x"), E], [S, *ids("ctx"), D, *ids("yz"), E]]),
])
def test_input_transformations(fmt, example, expected):
    assert [s.tolist() for s in sequences(example, fmt, TOK, 64)] == expected


def test_truncation_as_released():
    """max_len 10: each of two texts keeps its first 10 // 2 - 2 = 3 tokens, a multiple-choice
    context too (the release's transform_roc: x1[:max_len]); a single text its first 10 - 2 = 8."""
    assert sequences(Example(("abcdefghijk",), 0), "classification", TOK, 10)[0].tolist() == \
        [S, *ids("abcdefgh"), E]
    assert sequences(Example(("abcdef", "uvwxyz"), 0), "entailment", TOK, 10)[0].tolist() == \
        [S, *ids("abc"), D, *ids("uvw"), E]
    assert sequences(Example(("abcdef?",), 0, ("uvwxyz",)), "multiple_choice", TOK, 10)[0].tolist() == \
        [S, *ids("abc"), D, *ids("uvw"), E]


def test_arrays_pad_and_point_at_extract():
    seqs = sequences(Example(("ab", "c"), 1), "similarity", TOK, 64)
    arrays = to_arrays(seqs, 1, 8)
    assert arrays["tokens"].tolist() == [[S, 97, 98, D, 99, E, 0, 0], [S, 99, D, 97, 98, E, 0, 0]]
    assert arrays["extract"].tolist() == [5, 5] and arrays["lengths"].tolist() == [6, 6]
    assert arrays["label"] == 1 and arrays["weight"] == 1


def test_eval_batches_cover_each_example_once():
    task = tasks.Task("classification", 2, ("accuracy",))
    split = pipeline.encode([Example((str(i),), i % 2) for i in range(5)], task, TOK, 16, "eval")
    batches = pipeline.make_eval_batches(split, 8, batch_size=2)
    assert len(batches) == 3
    weights = np.concatenate([b["weight"] for b in batches])
    assert weights.tolist() == [1, 1, 1, 1, 1, 0]
    firsts = [chr(b["tokens"][r, 0, 1]) for b in batches for r in range(2)]
    assert firsts[:5] == list("01234")


def test_metrics_against_hand_computed_values():
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, tn 1, fp 1, fn 1
    assert metrics.accuracy(pred, gold) == pytest.approx(60.0)
    assert metrics.f1(pred, gold) == pytest.approx(100 * 4 / 6)
    assert metrics.matthews_corr(pred, gold) == pytest.approx(100 * (2 - 1) / np.sqrt(3 * 3 * 2 * 2))
    assert metrics.matthews_corr([1, 1, 1], [1, 0, 1]) == 0.0  # one class predicted
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    mx, my = np.mean(x), np.mean(y)
    r = np.sum((np.array(x) - mx) * (np.array(y) - my)) / np.sqrt(
        np.sum((np.array(x) - mx) ** 2) * np.sum((np.array(y) - my) ** 2))
    assert metrics.pearson(x, y) == pytest.approx(100 * r)
    assert metrics.spearman(x, y) == pytest.approx(100 * (1 - 6 * (0 + 1 + 1 + 0) / (4 * 15)))


def _model_and_batch(multiple_choice=False):
    cfg = GPTConfig(vocab_size=TOK.vocab_size, max_len=16, n_layer=1, d_model=16, n_head=2, d_ff=32,
                    embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    examples = [Example(("ab",), 1, ("c", "de") if multiple_choice else ()),
                Example(("xyz",), 0, ("fgh", "i") if multiple_choice else ())]
    fmt = "multiple_choice" if multiple_choice else "classification"
    rows = [to_arrays(sequences(e, fmt, TOK, 16), e.label, 12) for e in examples]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    model = GPTClassifier(cfg, num_outputs=2, num_sequences=2 if multiple_choice else 1,
                          multiple_choice=multiple_choice, clf_pdrop=0.0)
    params = model.init(jax.random.PRNGKey(0), *model.example_inputs(12))["params"]
    return cfg, model, params, batch


@pytest.mark.parametrize("multiple_choice", [False, True])
def test_objective_is_task_loss_plus_lambda_lm_loss(multiple_choice):
    cfg, model, params, batch = _model_and_batch(multiple_choice)
    scores, _ = model.apply({"params": params}, batch["tokens"], batch["extract"])
    labels = batch["label"].astype(np.int32)
    task_loss = float(np.mean(-jax.nn.log_softmax(scores)[np.arange(2), labels]))
    total0, aux0 = make_loss(0.0, False)(params, model.apply, batch, None, False)
    assert float(total0) == pytest.approx(task_loss, rel=1e-6) and "lm_loss" not in aux0

    # LM loss by hand, one sequence at a time through the plain GPT: the same parameters.
    lm_params = {k: v for k, v in params.items() if k != "clf"}
    per_sequence = []
    for tokens, length in zip(batch["tokens"].reshape(-1, 12), batch["lengths"].reshape(-1)):
        real = tokens[:length]
        logits = GPT(cfg).apply({"params": lm_params}, real[None, :-1])[0]
        per_sequence.append(float(optax.softmax_cross_entropy_with_integer_labels(logits, real[1:]).mean()))
    total, aux = make_loss(0.5, False)(params, model.apply, batch, None, False)
    assert float(aux["lm_loss"]) == pytest.approx(np.mean(per_sequence), rel=1e-5)
    assert float(total) == pytest.approx(task_loss + 0.5 * np.mean(per_sequence), rel=1e-5)


def test_similarity_sums_both_orders():
    cfg = GPTConfig(vocab_size=TOK.vocab_size, max_len=16, n_layer=1, d_model=16, n_head=2, d_ff=32)
    model = GPTClassifier(cfg, num_outputs=3, num_sequences=2)
    rows = to_arrays(sequences(Example(("ab", "c"), 0), "similarity", TOK, 16), 0, 8)
    params = model.init(jax.random.PRNGKey(1), *model.example_inputs(8))["params"]
    scores, _ = model.apply({"params": params}, rows["tokens"][None], rows["extract"][None])
    h = GPT(cfg).apply({"params": {k: v for k, v in params.items() if k != "clf"}},
                       rows["tokens"], method=GPT.hidden_states)
    summed = h[0, rows["extract"][0]] + h[1, rows["extract"][1]]
    expected = summed @ params["clf"]["kernel"] + params["clf"]["bias"]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5, atol=1e-6)


def test_special_rows_are_appended_after_a_table_larger_than_the_tokenizer():
    """A pre-trained table of 264 rows for 257 byte ids: [start], [delim], [extract] are rows
    264-266, new, drawn as the release draws them (N(0, 0.02)); rows 257-263 stay trained."""
    tok = bytes_tokenizer().with_special_tokens(after=264)
    assert [tok.special_ids[n] for n in ("<start>", "<delim>", "<extract>")] == [264, 265, 266]
    assert tok.vocab_size == 267
    cfg = GPTConfig(vocab_size=tok.vocab_size, max_len=16, n_layer=1, d_model=64, n_head=2, d_ff=32)
    model = GPTClassifier(cfg, num_outputs=2)
    fresh = model.init(jax.random.PRNGKey(0), *model.example_inputs(12))["params"]
    pretrained = {k: jax.tree_util.tree_map(lambda x: x + 1.0, v) for k, v in fresh.items() if k != "clf"}
    pretrained["wte"] = {"embedding": np.asarray(fresh["wte"]["embedding"][:264]) + 1.0}
    loaded = load_pretrained(fresh, pretrained)
    np.testing.assert_array_equal(loaded["h_0"]["mlp"]["c_fc"]["kernel"], fresh["h_0"]["mlp"]["c_fc"]["kernel"] + 1)
    np.testing.assert_array_equal(loaded["wte"]["embedding"][:264], pretrained["wte"]["embedding"])
    new_rows = loaded["wte"]["embedding"][264:]
    np.testing.assert_array_equal(new_rows, fresh["wte"]["embedding"][264:])
    assert abs(float(np.std(new_rows)) - 0.02) < 0.003 and abs(float(np.mean(new_rows))) < 0.005
    np.testing.assert_array_equal(loaded["clf"]["kernel"], fresh["clf"]["kernel"])


def test_schedule_is_the_released_warmup_linear():
    """finetune-transformer-lm opt.py, `warmup_linear(x, warmup=0.002)`: s * (x / warmup) +
    (1 - s) * (1 - x), s = x <= warmup, at x = t / t_total for the t-th update (t from 1),
    times the paper's lr 6.25e-5; 64,000 examples in batches of 32 for 3 epochs: 6,000 updates."""
    c = get_finetune_config("sst2")
    finetune.set_steps(c, 64_000)
    assert (c.train.steps, c.optim.lr) == (6000, 6.25e-5)
    schedule = lr_schedule(c.optim, c.train.steps)

    def released(t):
        x = t / 6000
        s = float(x <= 0.002)
        return 6.25e-5 * (s * (x / 0.002) + (1 - s) * (1 - x))

    for step in (0, 1, 5, 10, 11, 12, 13, 100, 3000, 5998, 5999):
        np.testing.assert_allclose(float(schedule(step)), released(step + 1), rtol=1e-5, atol=1e-13)


def test_fine_tuning_steps_and_warmup_come_from_epochs_and_fraction():
    c = get_finetune_config("sst2")
    c.optim.warmup_fraction = 0.0
    finetune.set_steps(c, 640)
    assert (c.train.steps, c.optim.warmup_steps) == (60, 0)  # not pre-training's 2,000
    for key, value in (("train.epochs", float("nan")), ("train.epochs", 0.0), ("optim.warmup_fraction", 1.5),
                       ("optim.warmup_fraction", float("nan"))):
        c = get_finetune_config("sst2")
        c[key.split(".")[0]][key.split(".")[1]] = value
        with pytest.raises(ConfigError, match=f"^{re.escape(key)}="):
            finetune.set_steps(c, 640)


# ---- learning synthetic tasks from a tiny pre-trained run ----------------------------------

def _write_jsonl(directory, name, rows):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Classification: does the word contain "q"? (the model must look back from [extract]).
    Multiple choice: which answer is the longest? (a score per answer, compared by the
    softmax over answers)."""
    root = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    letters = list("abcdefghij")
    for split, n in (("train", 640), ("validation", 200)):
        rows = []
        for _ in range(n):
            word = "".join(rng.choice(letters, 6))
            label = int(rng.integers(2))
            if label:
                word = word[:3] + "q" + word[4:]
            rows.append({"text": word, "label": label})
        _write_jsonl(root / "cls", split, rows)
        rows = []
        for _ in range(n):
            lengths = rng.choice(np.arange(1, 7), 3, replace=False)
            answers = ["".join(rng.choice(letters, k)) for k in lengths]
            rows.append({"context": "".join(rng.choice(letters, 4)), "choices": answers,
                         "label": int(np.argmax(lengths))})
        _write_jsonl(root / "mc", split, rows)
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A GPT-2-style tiny run on the bytes of the offline corpus, 20 steps; its embedding table
    has 264 rows for the tokenizer's 257 ids."""
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    data_dir = str(tmp_path_factory.mktemp("data"))
    model = ["--config.model.n_layer=2", "--config.model.d_model=32", "--config.model.n_head=4",
             "--config.model.d_ff=64", "--config.model.max_len=32", "--config.model.vocab_size=264"]
    result = run("experiments.train", "--config=configs/gpt2.py:tiny", f"--workdir={workdir}",
                 f"--config.data.data_dir={data_dir}", "--config.data.seq_len=32", *model,
                 "--config.train.steps=20", "--config.train.eval_steps=1", "--config.train.peak_flops=1e9")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def _finetune_config(pretrained, task_dir, fmt, num_labels, **overrides):
    c = get_finetune_config(f"jsonl:{task_dir}")
    c.init_from = pretrained
    c.task.format, c.task.num_labels, c.task.metrics = fmt, num_labels, ("accuracy",)
    c.data.batch_size, c.data.seq_len = 32, 32
    c.optim.lr = 3e-3
    c.train.epochs = 8.0
    c.train.log_every = c.train.eval_every = c.train.ckpt_every = 40
    c.train.peak_flops = 1e9
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


@pytest.mark.parametrize("kind,fmt,num_labels,chance", [
    ("cls", "classification", 2, 50.0), ("mc", "multiple_choice", 3, 100 / 3)])
def test_finetuning_learns_well_above_chance(pretrained, synthetic, tmp_path, kind, fmt, num_labels, chance):
    config = _finetune_config(pretrained, synthetic / kind, fmt, num_labels)
    last = finetune.finetune(config, str(tmp_path))
    assert last["eval/accuracy"] > chance + 35, last
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert records[-1]["step"] == config.train.steps == 8 * (640 // 32)
    assert {"eval/accuracy", "eval/loss", "train/task_loss", "train/lm_loss"} <= set(records[-1])
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["model"]["vocab_size"] == 264 + 3 and saved["optim"]["warmup_steps"] == round(0.002 * 160)
    pre = json.load(open(os.path.join(pretrained, "config.json")))
    tokenizer_keys = lambda d: {k: v for k, v in d.items() if k not in ("batch_size", "seq_len")}  # noqa: E731
    assert tokenizer_keys(saved["data"]) == tokenizer_keys(pre["data"])  # the run's tokenizer, exactly


def test_lambda_zero_drops_the_lm_term(pretrained, synthetic, tmp_path):
    config = _finetune_config(pretrained, synthetic / "cls", "classification", 2,
                              **{"finetune.lm_coef": 0.0, "train.epochs": 0.25})
    finetune.finetune(config, str(tmp_path))
    record = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
    assert "train/lm_loss" not in record and record["train/loss"] == record["train/task_loss"]


def test_bad_task_config_names_the_key(synthetic):
    with pytest.raises(ConfigError, match="task.name"):
        tasks.get_task(get_finetune_config("glue/sst3").task)
    c = get_finetune_config(f"jsonl:{synthetic / 'cls'}")
    c.task.format = "ranking"
    with pytest.raises(ConfigError, match="task.format"):
        tasks.get_task(c.task)
    c.task.format, c.task.num_labels, c.task.metrics = "classification", 2, ("pearson",)
    with pytest.raises(ConfigError, match="task.metrics"):
        tasks.get_task(c.task)


def test_label_out_of_range_is_one_line(synthetic, tmp_path):
    _write_jsonl(tmp_path, "train", [{"text": "a", "label": 2}])
    c = get_finetune_config(f"jsonl:{tmp_path}")
    c.task.format, c.task.num_labels, c.task.metrics = "classification", 2, ("accuracy",)
    task = tasks.get_task(c.task)
    with pytest.raises(ValueError, match="train example 0: label 2.0 is not an index below 2"):
        pipeline.encode(tasks.load_examples(task, c.task, "train"), task, TOK, 16, "train")


@pytest.mark.parametrize("fmt,num_labels,row,message", [
    ("classification", 2, {"text": "a", "label": None}, "field 'label' is None; it must be an integer"),
    ("classification", 2, {"text": "a", "label": [1]}, r"field 'label' is \[1\]; it must be an integer"),
    ("classification", 2, {"text": {"a": 1}, "label": 1}, "field 'text' is {'a': 1}; it must be a string"),
    ("multiple_choice", 2, {"context": "c", "choices": "ab", "label": 0},
     "field 'choices' is 'ab'; it must be a list of strings"),
    ("similarity", 1, {"text_a": "a", "text_b": "b", "label": float("nan")},
     "field 'label' is nan; it must be a finite number"),
])
def test_bad_jsonl_field_names_file_line_and_field(tmp_path, fmt, num_labels, row, message):
    good = {"classification": {"text": "a", "label": 1},
            "multiple_choice": {"context": "c", "choices": ["a", "b"], "label": 1},
            "similarity": {"text_a": "a", "text_b": "b", "label": 0.5}}[fmt]
    _write_jsonl(tmp_path, "train", [good, row])
    c = get_finetune_config(f"jsonl:{tmp_path}")
    c.task.format, c.task.num_labels = fmt, num_labels
    c.task.metrics = ("pearson",) if num_labels == 1 else ("accuracy",)
    task = tasks.get_task(c.task)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'train.jsonl'))}:2: {message}"):
        tasks.load_examples(task, c.task, "train")


def test_command_line(pretrained, synthetic, tmp_path):
    args = ["--config=configs/finetune/sst2.py", f"--config.init_from={pretrained}",
            f"--config.task.name=jsonl:{synthetic / 'cls'}", "--config.task.format=classification",
            "--config.task.num_labels=2", "--config.task.metrics=('f1', 'accuracy')",
            "--config.train.epochs=0.25", "--config.train.peak_flops=1e9", f"--workdir={tmp_path}"]
    result = run("experiments.finetune", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith(f"jsonl:{synthetic / 'cls'}: validation f1 ")
    assert f"from the pre-trained weights of {pretrained}" in result.stdout
    assert "from scratch" not in result.stdout + result.stderr

    bad = run("experiments.finetune", "--config=configs/finetune/sst2.py", f"--workdir={tmp_path / 'x'}",
              f"--config.data.data_dir={tmp_path / 'empty'}")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: task.name='glue/sst2': the TFDS dataset glue/sst2 is not prepared")

    _write_jsonl(tmp_path / "null", "train", [{"text": "a", "label": None}])
    bad = run("experiments.finetune", *args[:2], f"--config.task.name=jsonl:{tmp_path / 'null'}", *args[3:-1],
              f"--workdir={tmp_path / 'y'}")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith(f"error: {tmp_path / 'null' / 'train.jsonl'}:1: field 'label' is None;")


def test_classifier_dropout_alone_turns_dropout_on():
    """With the stack's rates at 0 the train step must still pass a dropout key for the
    classifier's 0.1, and then the training loss differs from the deterministic one."""
    cfg, model, params, batch = _model_and_batch()
    dropped = model.clone(clf_pdrop=0.5)
    assert dropped.uses_dropout and not GPT(cfg).uses_dropout
    loss = make_loss(0.0, False)
    train_loss, _ = loss(params, dropped.apply, batch, jax.random.PRNGKey(0), True)
    eval_loss, _ = loss(params, dropped.apply, batch, None, False)
    assert float(train_loss) != pytest.approx(float(eval_loss), rel=1e-6)


def test_task_prepared_as_tfrecord_is_one_line(monkeypatch):
    """TFDS prepares GLUE as TFRecord by default, which only TensorFlow reads: the error says
    so and how to prepare ArrayRecord, naming the task key."""
    import tensorflow_datasets as tfds

    def tfrecord_only(self, split):
        raise NotImplementedError("TFRecord")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", tfrecord_only)
    c = get_finetune_config("sst2")
    with pytest.raises(ValueError, match=r"^task.name='glue/sst2': .* not ArrayRecord; prepare it again"):
        tasks.load_examples(tasks.get_task(c.task), c.task, "train")


# ---- the benchmarks' splits ----------------------------------------------------------------

def _story_cloze_csv(path, story_ids):
    """Rows in the layout of the 2016 release's cloze_test_*__spring2016.csv, which TFDS reads."""
    cols = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
            "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        for i, story in enumerate(story_ids):
            writer.writerow([story, f"{story} one.", "Two.", "Three.", "Four.", "Good end.", "Bad end.", 1 + i % 2])


def test_story_cloze_trains_on_validation_and_evaluates_on_test(tmp_path):
    """GPT-1's 86.5 is a test-set figure; the release trains on (most of) the validation set."""
    import tensorflow_datasets as tfds

    manual = tmp_path / "manual"
    manual.mkdir()
    _story_cloze_csv(manual / "cloze_test_val__spring2016.csv", ["v1", "v2"])
    _story_cloze_csv(manual / "cloze_test_test__spring2016.csv", ["t1", "t2", "t3"])
    tfds.builder("story_cloze/2016", data_dir=str(tmp_path / "tfds")).download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    c = get_finetune_config("story_cloze")
    task = tasks.get_task(c.task)
    contexts = {split: sorted(e.texts[0].split()[0] for e in tasks.load_examples(task, c.task, split, str(tmp_path / "tfds")))
                for split in ("train", "eval")}
    assert contexts == {"train": ["v1", "v2"], "eval": ["t1", "t2", "t3"]}
    example = next(e for e in tasks.load_examples(task, c.task, "eval", str(tmp_path / "tfds"))
                   if e.texts[0].startswith("t2"))
    assert example == Example(("t2 one. Two. Three. Four.",), 1.0, ("Good end.", "Bad end."))


@pytest.mark.parametrize("name,split", [("snli", "test"), ("scitail", "test"), ("race_high", "test"),
                                        ("race_middle", "test"), ("mnli", "validation_matched")])
def test_evaluated_on_the_split_of_gpt1s_figure_where_its_labels_are_public(name, split):
    """GPT-1's tables 2 and 3 report test sets; GLUE's test labels are private."""
    assert tasks.get_task(get_finetune_config(name).task).eval_split == split


def test_race_is_the_union_of_high_and_middle_on_test(monkeypatch):
    """GPT-1's RACE 59.0 is the test accuracy over both levels. Rows as TFDS's race/* gives
    them (one article, its questions, options and answer letters); TFDS needs TensorFlow to
    write their nested options, so the prepared dataset is stood in for."""
    def rows(level, split):
        return [{"article": f"{level} {split}.".encode(), "questions": [b"Q1?", b"Q2?"],
                 "options": [[b"a", b"b", b"c", b"d"]] * 2, "answers": [b"B", b"D"],
                 "example_id": f"{level}1.txt".encode()}]

    asked = []
    monkeypatch.setattr(tasks.corpus, "tfds_split",
                        lambda name, split, data_dir, key: asked.append((name, split)) or rows(name, split))
    c = get_finetune_config("race")
    task = tasks.get_task(c.task)
    examples = tasks.load_examples(task, c.task, "eval")
    assert asked == [("race/high", "test"), ("race/middle", "test")]
    assert examples == [Example((f"race/{level} test.\nQ{q}?",), label, ("a", "b", "c", "d"))
                        for level in ("high", "middle") for q, label in ((1, 1.0), (2, 3.0))]
    tasks.load_examples(task, c.task, "train")
    assert asked[2:] == [("race/high", "train"), ("race/middle", "train")]
