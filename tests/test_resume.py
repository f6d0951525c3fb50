"""Runs that survive crashes: kill -9, SIGTERM, corrupt checkpoints, NaN, changed configs."""
import glob
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from tests.helpers import run, start

STEPS = 60


def _args(workdir, data_dir, *extra):
    return ["--config=configs/gpt2.py:tiny", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            f"--config.train.steps={STEPS}", "--config.train.ckpt_every=10", "--config.train.log_every=5",
            "--config.train.eval_every=20", "--config.train.eval_steps=2", "--config.data.batch_size=8",
            "--config.train.peak_flops=1e9", *extra]


def _losses(workdir):
    keys = ("train/loss", "train/lr", "train/grad_norm", "eval/loss")
    return [(r["step"], *(r.get(k) for k in keys)) for r in map(json.loads, open(f"{workdir}/metrics.jsonl"))]


def _params(workdir):
    from experiments.common import load_run
    return load_run(workdir)[2]


def _saved_steps(workdir):
    """The committed checkpoints: a kill mid-save also leaves N.orbax-checkpoint-tmp."""
    return [int(name) for name in os.listdir(f"{workdir}/checkpoints") if name.isdigit()]


def _start(args):
    return start("experiments.train", *args, stderr=subprocess.STDOUT)


def _wait_for_step(workdir, step, proc, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            lines = open(path).read().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = run("experiments.train", *_args(workdir, data_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir


def _assert_same_run(workdir, reference):
    assert _losses(workdir) == _losses(reference)
    for a, b in zip(jax.tree_util.tree_leaves(_params(workdir)), jax.tree_util.tree_leaves(_params(reference))):
        np.testing.assert_array_equal(a, b)


def test_sigkill_twice_then_resume_is_bit_identical(tmp_path, data_dir, reference):
    workdir = str(tmp_path)
    for kill_at in (15, 35):
        proc = _start(_args(workdir, data_dir))
        _wait_for_step(workdir, kill_at, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert max(_saved_steps(workdir)) < STEPS
    result = run("experiments.train", *_args(workdir, data_dir))
    assert result.returncode == 0 and "resuming from step" in result.stdout, result.stderr[-2000:]
    _assert_same_run(workdir, reference)


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, data_dir, reference):
    workdir = str(tmp_path)
    proc = _start(_args(workdir, data_dir, "--config.train.ckpt_every=1000"))
    _wait_for_step(workdir, 12, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = _saved_steps(workdir)
    assert len(saved) == 1 and 12 <= saved[0] < STEPS, saved
    assert f"SIGTERM: saved a checkpoint at step {saved[0]}" in out
    result = run("experiments.train", *_args(workdir, data_dir, "--config.train.ckpt_every=1000"))
    assert result.returncode == 0 and f"resuming from step {saved[0]}" in result.stdout
    _assert_same_run(workdir, reference)


def test_truncated_latest_checkpoint_falls_back(tmp_path, data_dir, reference):
    workdir = str(tmp_path)
    result = run("experiments.train", *_args(workdir, data_dir, "--config.train.steps=30"))
    assert result.returncode == 0
    for path in glob.glob(f"{workdir}/checkpoints/30/state/**/d/*", recursive=True):
        os.truncate(path, 10)
    result = run("experiments.train", *_args(workdir, data_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: checkpoint at step 30")]
    assert len(warnings) == 1 and "resuming from step 20" in result.stdout, result.stdout
    assert os.listdir(f"{workdir}/checkpoints.unreadable")
    _assert_same_run(workdir, reference)


def test_nan_stops_with_message_and_keeps_last_checkpoint_finite(tmp_path, data_dir):
    workdir = str(tmp_path)
    result = run("experiments.train", *_args(workdir, data_dir, "--config.train.poison_step=23"))
    assert result.returncode == 3
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: non-finite loss or gradient at step 25; last good checkpoint: step 20 in {workdir}"]
    assert max(_saved_steps(workdir)) == 20
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(_params(workdir)))
    assert json.loads(open(f"{workdir}/metrics.jsonl").read().splitlines()[-1])["diverged"] is True


def test_skip_nonfinite_skips_the_poisoned_update(tmp_path, data_dir):
    workdir = str(tmp_path)
    result = run("experiments.train", *_args(workdir, data_dir, "--config.train.poison_step=23",
                                             "--config.train.skip_nonfinite=true", "--config.train.steps=30"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(_params(workdir)))


def test_resume_rejects_shape_changes_and_records_safe_ones(tmp_path, data_dir):
    workdir = str(tmp_path)
    assert run("experiments.train", *_args(workdir, data_dir, "--config.train.steps=10")).returncode == 0
    bad = run("experiments.train", *_args(workdir, data_dir, "--config.model.d_model=64"))
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: model.d_model=64") and "made with model.d_model=128" in bad.stderr
    ok = run("experiments.train", *_args(workdir, data_dir, "--config.train.steps=15", "--config.train.eval_every=5"))
    assert ok.returncode == 0 and "resuming from step 10" in ok.stdout
    changes = json.loads(open(f"{workdir}/resumes.jsonl").read().splitlines()[-1])["changes"]
    assert changes == {"train.eval_every": [20, 5], "train.steps": [10, 15]}
