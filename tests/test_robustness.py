"""Runs you can trust: damaged checkpoints are never restored as healthy, a full disk or a
signal never loses a committed checkpoint nor hangs, one workdir holds one run, and bad
values are refused before anything compiles. Failures are injected, not raced."""
import errno
import json
import math
import os
import subprocess
import sys
import threading

import grain
import jax
import numpy as np
import psutil
import pytest

from experiments import common, loop
from gpt import sampling
from gpt.checkpoint import CHECKSUMS, Checkpointer, NoReadableCheckpoint, SaveFailed
from gpt.config import ConfigError, resume_changes, validate
from tests.helpers import ROOT, batches, model_and_state, run, tiny_config


def _iterator(position=0):
    """A checkpointable data iterator (grain's), `position` elements in."""
    iterator = iter(grain.MapDataset.range(1000).to_iter_dataset())
    for _ in range(position):
        next(iterator)
    return iterator


@pytest.fixture
def two_checkpoints(tmp_path):
    """Steps 1 and 2 of a tiny state, each with its data iterator (at 11 and 22)."""
    _, _, state = model_and_state(tiny_config())
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    for step in (1, 2):
        ckpt.save(step, jax.tree_util.tree_map(lambda x, s=step: x + s, state), _iterator(11 * step), {"step": step})
    ckpt.close()
    return tmp_path / "checkpoints", state


def _flip_a_bit(path):
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 1
    path.write_bytes(bytes(content))


def _state_chunks(step_dir):
    return sorted(step_dir.glob("state/ocdbt.process_0/d/*"))


DAMAGE = {
    "data iterator state removed": lambda d: __import__("shutil").rmtree(d / "data"),
    "a bit flipped in a state chunk": lambda d: [_flip_a_bit(p) for p in _state_chunks(d)],
    "state manifest removed": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "a state chunk truncated": lambda d: [os.truncate(p, 10) for p in _state_chunks(d)],
    "checksums removed": lambda d: (d / CHECKSUMS).unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_refused_for_the_one_before(two_checkpoints, damage):
    directory, state = two_checkpoints
    DAMAGE[damage](directory / "2")
    iterator = _iterator()
    restored, step, unreadable = Checkpointer(str(directory)).restore_latest_valid(state, iterator)
    assert step == 1 and [s for s, _, _ in unreadable] == [2], unreadable
    assert next(iterator) == 11  # step 1's data position, not the start of the stream
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(a, np.asarray(b) + 1)
    assert sorted(os.listdir(directory)) == ["1"] and os.listdir(directory.parent / "checkpoints.unreadable")


def test_when_none_is_readable_nothing_is_changed(two_checkpoints):
    directory, state = two_checkpoints
    for step in ("1", "2"):
        _flip_a_bit(_state_chunks(directory / step)[0])
    before = sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))
    with pytest.raises(NoReadableCheckpoint, match=r"no checkpoint in .* is readable \(step 2: .*; step 1: "):
        Checkpointer(str(directory)).restore_latest_valid(state, _iterator())
    assert sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) == before
    assert not (directory.parent / "checkpoints.unreadable").exists()


def test_keep_best_survives_a_restart(tmp_path):
    """The best checkpoint (step 3) outlives later ones across a new Checkpointer, as on resume."""
    state = {"w": np.arange(4.0)}
    ckpt = Checkpointer(str(tmp_path), keep=2, keep_best=True)
    for step, loss in [(1, 5.0), (2, 3.0), (3, 1.0), (4, 2.0)]:
        ckpt.save(step, state, None, {}, metrics={"eval/loss": loss})
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path), keep=2, keep_best=True)
    for step, loss in [(5, 4.0), (6, 4.5)]:
        ckpt.save(step, state, None, {}, metrics={"eval/loss": loss})
    ckpt.close()
    assert ckpt.all_steps() == [3, 5, 6]


def test_a_failed_save_is_one_oserror(tmp_path, monkeypatch):
    """orbax raises tensorstore's full disk as a ValueError hundreds of characters long."""
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, {"w": np.arange(4.0)}, None, {})

    def full_disk():
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"w/0\" in OCDBT database at local file "
                         "\"/x\": Failed to write 50843 bytes to file 4: No space left on device "
                         "[os_error_code='28']")

    monkeypatch.setattr(ckpt.manager, "wait_until_finished", full_disk)
    with pytest.raises(SaveFailed, match=r"^cannot save the checkpoint at step 1 in \S+ \(No space left "
                                         r"on device\); the checkpoints saved before it are kept$"):
        ckpt.close()


def _read_events(directory):
    """(step, tag, value) of every scalar in the TensorBoard event files: TFRecord framing."""
    from tensorboardX.proto.event_pb2 import Event

    points = []
    for name in os.listdir(directory):
        content = open(os.path.join(directory, name), "rb").read()
        offset = 0
        while offset < len(content):
            length = int.from_bytes(content[offset:offset + 8], "little")
            event = Event.FromString(content[offset + 12:offset + 12 + length])
            points += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
            offset += 12 + length + 4
    return sorted(points)


def test_metrics_reach_disk_at_every_step_and_a_torn_line_is_dropped(tmp_path):
    writer = common.MetricWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.write(step, {"train/loss": float(step)})
    # nothing closed or flushed by hand, as after kill -9
    assert _read_events(tmp_path / "tensorboard") == [(s, "train/loss", s) for s in (1, 2, 3)]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/lo')  # a write cut short by a kill
    writer = common.MetricWriter(str(tmp_path), resume_step=3)
    writer.write(4, {"train/loss": 4.0})
    writer.close()
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_full_disk_under_tensorboard_raises_instead_of_hanging(tmp_path, monkeypatch):
    from tensorboardX import record_writer

    writer = common.MetricWriter(str(tmp_path))

    def no_space(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "write", no_space)
    raised = []

    def write_many():
        try:
            for step in range(100):
                writer.write(step, {"train/loss": 1.0})
        except OSError as e:
            raised.append(str(e))

    thread = threading.Thread(target=write_many, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert raised == [f"cannot write the metrics in {tmp_path} (No space left on device); the checkpoints "
                      "saved so far are kept: rerun the command to resume"]


def _tiny_job(config):
    model, _, _ = model_and_state(config)
    data = batches(config, 4)
    return loop.Job(model=model, seq_len=config.data.seq_len,
                    tokens_per_step=config.data.batch_size * config.data.seq_len,
                    train_iter=iter(grain.MapDataset.source(data).repeat().to_iter_dataset()),
                    eval_batches=data[:1], corpus="text-aaaa")


def _tiny_run_config(**overrides):
    return tiny_config(**{"train.steps": 8, "train.ckpt_every": 4, "train.log_every": 2,
                          "train.eval_every": 4, "train.eval_steps": 1, "train.peak_flops": 1e9,
                          **overrides})


def test_resume_refuses_an_edited_corpus_and_a_failed_write_keeps_the_checkpoints(tmp_path, monkeypatch):
    config = _tiny_run_config(**{"train.steps": 4})
    loop.run(config, str(tmp_path), _tiny_job(config), 1, None)
    config.train.steps = 8
    edited = _tiny_job(config)
    edited.corpus = "text-bbbb"
    with pytest.raises(ValueError, match=r"its text has changed since the checkpoints .* \(corpus text-aaaa, "
                                         r"now text-bbbb\)"):
        loop.run(config, str(tmp_path), edited, 1, None)

    write = common.MetricWriter.write

    def full_disk_at_step_6(self, step, metrics):
        if step == 6:
            raise OSError("cannot write the metrics (No space left on device)")
        write(self, step, metrics)

    monkeypatch.setattr(common.MetricWriter, "write", full_disk_at_step_6)
    with pytest.raises(OSError, match="No space left on device"):
        loop.run(config, str(tmp_path), _tiny_job(config), 1, None)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [4]
    ckpt.verify(4)


@pytest.mark.parametrize("key, value", [
    ("optim.lr", math.nan), ("optim.lr", math.inf), ("optim.b2", math.nan), ("optim.weight_decay", math.inf),
    ("model.init_std", math.nan), ("optim.end_lr", math.inf), ("optim.b1", 1.5), ("optim.eps", -1.0),
    ("optim.grad_clip", -1.0), ("train.epochs", math.nan)])
def test_bad_values_are_refused_before_compiling(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}={value!r} is not allowed: "):
        validate(tiny_config(**{key: value}))


def test_weight_decay_and_b2_may_change_on_resume():
    """Neither changes the saved state's shapes nor the data order: a resume may change them."""
    saved = tiny_config(**{"optim.weight_decay": 0.01, "optim.b2": 0.999}).to_dict()
    changed = tiny_config(**{"optim.weight_decay": 0.1, "optim.b2": 0.95}).to_dict()
    assert resume_changes(saved, changed) == ({}, {"optim.b2": (0.999, 0.95), "optim.weight_decay": (0.01, 0.1)})


def test_infinite_temperature_is_refused():
    with pytest.raises(ValueError, match=r"^temperature=inf is not allowed"):
        sampling.check_settings(10, math.inf, 0, 1.0)


@pytest.fixture
def saved_run(tmp_path):
    """A run's directory as training leaves it: config.json and checkpoints 1 and 2."""
    config = tiny_config()
    _, _, state = model_and_state(config)
    common.write_json_atomic(str(tmp_path / "config.json"), config.to_dict())
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    for step in (1, 2):
        ckpt.save(step, state.replace(params=jax.tree_util.tree_map(lambda x, s=step: x * s, state.params)),
                  None, config.to_dict())
    ckpt.close()
    return tmp_path, state


def test_load_run_falls_back_past_an_unreadable_latest(saved_run, capsys):
    workdir, state = saved_run
    (workdir / "checkpoints" / "2" / "state" / "manifest.ocdbt").unlink()
    _, _, params = common.load_run(str(workdir))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(a, b)  # step 1's
    assert capsys.readouterr().err.splitlines() == [
        "warning: checkpoint at step 2 is unreadable (state/manifest.ocdbt is missing); using step 1"]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]  # reading moves nothing


@pytest.mark.parametrize("flag, error", [
    ("--top_k=1000", "error: --top_k=1000 is not allowed: at most the model's vocabulary (257; 0: off)"),
    ("--seed=-1", "error: --seed=-1 is not allowed: a non-negative integer")])
def test_sampling_refuses_bad_arguments(saved_run, flag, error):
    result = run("experiments.sample", f"--workdir={saved_run[0]}", flag)
    assert result.returncode == 2 and result.stderr.splitlines() == [error + " (--verbose shows the traceback)"]


HOLD_THE_LOCK = """
import sys, time
from experiments import common
common.prepare_workdir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_workdir_is_refused_and_a_dead_holder_leaves_no_lock(tmp_path, data_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline() == "locked\n"
        second = run("experiments.train", "--config=configs/gpt2.py:tiny", f"--workdir={tmp_path}",
                     f"--config.data.data_dir={data_dir}", "--config.train.steps=1")
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2 and second.stderr.splitlines() == [
        f"error: --workdir={tmp_path} is in use by another program (process {holder.pid}); wait for it "
        "to end or use another --workdir (--verbose shows the traceback)"]
    common.prepare_workdir(str(tmp_path))  # the kernel released the dead holder's lock


SIGNALS_AT_THE_WORST_TIMES = """
import os, signal, sys
from experiments import common, loop, train
from gpt import checkpoint

write, close = common.MetricWriter.write, checkpoint.Checkpointer.close

def write_then_ctrl_c(self, step, metrics):
    write(self, step, metrics)
    if step == 3:  # Ctrl-C mid-iteration, as it lands in a JAX callback
        os.kill(os.getpid(), signal.SIGINT)

def close_under_sigterm(self):
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal while the last save commits
    close(self)

common.MetricWriter.write, checkpoint.Checkpointer.close = write_then_ctrl_c, close_under_sigterm
sys.argv = ["train"] + sys.argv[1:]
loop.run_program(train.main)
"""


def test_ctrl_c_then_sigterm_while_the_save_commits_keeps_the_checkpoint(tmp_path, data_dir):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", SIGNALS_AT_THE_WORST_TIMES, "--config=configs/gpt2.py:tiny",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.train.steps=50",
         "--config.train.log_every=1", "--config.train.ckpt_every=1000", "--config.data.batch_size=8",
         "--config.train.eval_steps=1", "--config.train.peak_flops=1e9"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGINT: saved a checkpoint at step 4; rerun the command to resume" in result.stdout
    ckpt = Checkpointer(str(workdir / "checkpoints"))
    assert ckpt.all_steps() == [4] and os.listdir(workdir / "checkpoints") == ["4"]
    ckpt.verify(4)


WORKERS = """
import sys, time
from gpt import data
from tests.helpers import tiny_config
config = tiny_config(**{"data.num_workers": 2, "data.data_dir": sys.argv[1], "data.batch_size": 2})
config.data.tokenizer = "bytes"
iterator = data.make_train_iterator(config.data, seed=0)
next(iterator)
print("reading", flush=True)
time.sleep(600)
"""


def test_tokenizing_workers_end_with_their_parent(data_dir):
    parent = subprocess.Popen([sys.executable, "-c", WORKERS, data_dir], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert parent.stdout.readline() == "reading\n"
    workers = psutil.Process(parent.pid).children(recursive=True)
    assert len(workers) >= 2
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)  # grain's own outlive it by 90 s or more
    assert not alive
