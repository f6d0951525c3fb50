"""End to end through the command line, as a user runs it."""
import json
import os

import pytest

from tests.helpers import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """GPT-2 tiny for 150 steps; the same command run a second time must resume."""
    workdir = str(tmp_path_factory.mktemp("run"))
    args = ["--config=configs/gpt2.py:tiny", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            "--config.train.steps=150", "--config.train.eval_every=50", "--config.train.ckpt_every=50",
            "--config.train.log_every=25", "--config.train.eval_steps=4"]
    first = run("experiments.train", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    return workdir, args, first


def test_training_learns_below_unigram_entropy(trained, data_dir):
    from gpt import data
    from tests.helpers import tiny_config

    workdir, _, first = trained
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [25, 50, 75, 100, 125, 150]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"):
        assert all(key in r for r in records), key
    assert [r["step"] for r in records if "eval/loss" in r] == [50, 100, 150]
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["train"]["steps"] == 150 and config["model"]["norm_position"] == "pre"
    data_cfg = tiny_config().data
    data_cfg.data_dir = data_dir
    entropy = data.unigram_entropy(data_cfg)
    assert records[-1]["eval/loss"] < entropy - 0.4, (records[-1], entropy)
    assert "final eval loss" in first.stdout
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "150"))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))


def test_rerun_resumes_and_continues(trained):
    workdir, args, _ = trained
    again = run("experiments.train", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already trained to step 150" in again.stdout + again.stderr
    more = run("experiments.train", *[a for a in args if "train.steps" not in a], "--config.train.steps=175")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming from step 150" in more.stdout + more.stderr
    assert "train.steps 150 -> 175: the learning-rate schedule is stretched" in more.stdout
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [25, 50, 75, 100, 125, 150, 175]


@pytest.mark.parametrize("flag, key", [
    ("--config.model.norm_position=middle", "model.norm_position"),
    ("--config.model.n_head=7", "model.n_head"),
    ("--config.train.parallelism=tpu", "train.parallelism"),
    ("--config.data.seq_len=4096", "data.seq_len"),
    ("--config.data.name=nope", "data.name"),
    ("--config.model.nope=1", "--config.model.nope: no such key"),
    ("--config.model.n_heads=4", "--config.model.n_heads: no such key; did you mean model.n_head?"),
    ("--config.trian.steps=4", "--config.trian.steps: no such key; did you mean train.steps?"),
    ("--config.train.steps=many", "--config.train.steps"),
    ("--config.train.steps=0", "train.steps"),
    ("--config.train.grad_accum_steps=3", "data.batch_size"),  # 64 sequences do not split 3 ways
    ("--config.train.mesh.fsdp=3", "train.mesh"),
])
def test_bad_flag_is_one_error_line(tmp_path, flag, key):
    result = run("experiments.train", "--config=configs/gpt1.py", f"--workdir={tmp_path}", flag,
                 *(["--config.train.parallelism=mesh"] if "mesh" in flag else []))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


@pytest.mark.parametrize("config, workdir, needle", [
    ("configs/nope.py", None, "configs/nope.py"),
    ("configs/gpt2.py:huge", None, "huge"),
    ("configs/gpt2.py:tiny", "/proc/no/such/dir", "--workdir=/proc/no/such/dir"),
])
def test_bad_paths_are_one_error_line(tmp_path, config, workdir, needle):
    data_dir = tmp_path / "data"
    result = run("experiments.train", f"--config={config}", f"--workdir={workdir or tmp_path}",
                 *([f"--config.data.data_dir={data_dir}"] if config.endswith("tiny") else []))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not data_dir.exists()  # it failed before preparing any corpus


def test_summary_prints_exact_counts():
    result = run("experiments.summary", "--config=configs/gpt2.py:xl")
    assert result.returncode == 0, result.stderr
    assert "1,557,611,200" in result.stdout and "matches" in result.stdout
    assert "25" in result.stdout.split("layers / d_model / heads")[1].splitlines()[0]


PROGRAMS = ["train", "evaluate", "sample", "finetune", "sweep", "convert", "bench", "summary", "plot"]

# Each program run as `python -m experiments.X -h` would run it, in one interpreter so that
# the libraries are imported once; the flags a program defined are dropped before the next.
_HELP_ALL = """
import runpy, sys
from absl import flags
from experiments import common
before = set(flags.FLAGS)
for name, arg in [(f"experiments.{p}", a) for p, a in zip(sys.argv[1::2], sys.argv[2::2])]:
    sys.argv = [name, arg]
    print(f"=== {name} {arg}", flush=True)
    try:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        print(f"=== exit {e.code}", flush=True)
    for flag in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, flag)
"""


def test_every_program_answers_help_with_its_flags():
    import subprocess
    import sys

    from tests.helpers import ROOT

    asked = [(p, "--help") for p in PROGRAMS] + [("sample", "-h"), ("train", "--helpfull")]
    result = subprocess.run([sys.executable, "-c", _HELP_ALL, *[x for pair in asked for x in pair]],
                            cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    sections = result.stdout.split("=== experiments.")[1:]
    assert len(sections) == len(asked), result.stdout[-3000:]
    for (program, flag), text in zip(asked, sections):
        assert text.startswith(f"{program} {flag}") and text.rstrip().endswith("=== exit 0"), text[-1000:]
        assert "verbose: Show full tracebacks" in text and f"python -m experiments.{program}" in text, text[:1000]
    assert "--workdir" in sections[0] and "--config.SECTION.KEY=VALUE" in sections[0]
    assert "--prompt" in sections[-2]
    assert "logtostderr:" in sections[-1] and "logtostderr:" not in sections[0]  # the libraries' flags
