"""What a run tells its user: the metrics it logs and when, MFU, event files, plots, wandb."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, run

MICRO = ["--config=configs/gpt2.py:tiny", "--config.model.n_layer=1", "--config.model.d_model=32",
         "--config.model.n_head=2", "--config.model.d_ff=64", "--config.data.seq_len=32",
         "--config.data.batch_size=4", "--config.train.steps=10", "--config.train.eval_steps=1",
         "--config.train.ckpt_every=1000"]


def _rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def every_step(tmp_path_factory, data_dir):
    """Logged at every step, evaluated only at the end (eval_every > steps), against a peak
    far below what the CPU achieves."""
    workdir = str(tmp_path_factory.mktemp("every_step"))
    result = run("experiments.train", *MICRO, f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                 "--config.train.log_every=1", "--config.train.eval_every=100",
                 "--config.train.peak_flops=1.0")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


@pytest.fixture(scope="module")
def intervals(tmp_path_factory, data_dir, every_step):
    """The same run logged every 5 steps and evaluated every 3: intervals that do not align."""
    workdir = str(tmp_path_factory.mktemp("intervals"))
    result = run("experiments.train", *MICRO, f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                 "--config.train.log_every=5", "--config.train.eval_every=3", "--config.train.peak_flops=1e12")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_eval_on_every_eval_every_step_and_at_the_end(every_step, intervals):
    assert [r["step"] for r in _rows(every_step[0]) if "eval/loss" in r] == [10]
    rows = _rows(intervals[0])
    assert [r["step"] for r in rows if "eval/loss" in r] == [3, 6, 9, 10]
    assert [r["step"] for r in rows if "train/loss" in r] == [5, 10]
    # the same weights at step 10, evaluated on the same batch
    assert rows[-1]["eval/loss"] == _rows(every_step[0])[-1]["eval/loss"]


def test_train_loss_is_the_mean_over_the_log_interval(every_step, intervals):
    per_step = {r["step"]: r for r in _rows(every_step[0])}
    logged = {r["step"]: r for r in _rows(intervals[0]) if "train/loss" in r}
    for step, first in ((5, 1), (10, 6)):
        losses = [per_step[s]["train/loss"] for s in range(first, step + 1)]
        np.testing.assert_allclose(logged[step]["train/loss"], np.mean(losses), rtol=1e-6)
        assert logged[step]["train/last_batch_loss"] == per_step[step]["train/loss"]
        assert logged[step]["train/lr"] == per_step[step]["train/lr"]


def test_mfu_is_never_above_one_and_the_peak_is_recorded(every_step, intervals):
    workdir, result = every_step
    rows = [r for r in _rows(workdir) if "train/mfu" in r]
    assert all(0 <= r["train/mfu"] <= 1 for r in rows), [r["train/mfu"] for r in rows]
    assert max(r["train/mfu"] for r in rows) == 1.0  # the first timed step set the peak
    assert rows[0]["train/peak_flops_per_device"] == 1.0
    assert "peak 1 FLOP/s per device (train.peak_flops)" in result.stdout
    assert "above the peak 1 (train.peak_flops)" in result.stdout
    assert "above the peak" not in intervals[1].stdout
    assert f"writing to {intervals[0]}" in intervals[1].stdout


def test_rows_carry_wall_clock_time_and_elapsed_seconds(every_step):
    import datetime

    rows = _rows(every_step[0])
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    times = [datetime.datetime.fromisoformat(r["time"]) for r in rows]
    assert all(t.tzinfo is not None for t in times) and times == sorted(times)


def test_datasheet_peaks_by_device_kind():
    from gpt import flops

    # NVIDIA's and Google's published dense figures, per chip
    assert flops.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert flops.datasheet_peak("NVIDIA H100 80GB HBM3", "float32") == 495e12  # TF32
    assert flops.datasheet_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert flops.datasheet_peak("NVIDIA H200", "bfloat16") == 989e12
    assert flops.datasheet_peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert flops.datasheet_peak("NVIDIA B200", "bfloat16") == 2.25e15
    assert flops.datasheet_peak("TPU v4", "bfloat16") == 275e12
    assert flops.datasheet_peak("TPU v5 lite", "bfloat16") == 197e12
    assert flops.datasheet_peak("TPU v5", "bfloat16") == 459e12
    assert flops.datasheet_peak("TPU v6 lite", "bfloat16") == 918e12
    assert flops.datasheet_peak("cpu", "float32") is None
    assert flops.peak_flops("float32", configured=5e9) == (5e9, "train.peak_flops")


def test_tensorboard_events_are_readable_after_each_write(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from experiments.common import MetricWriter

    writer = MetricWriter(str(tmp_path))
    writer.write(10, {"train/loss": 2.5})
    writer.write(20, {"train/loss": 2.0})
    events = EventAccumulator(str(tmp_path / "tensorboard"))  # read before the writer closes
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 2.5), (20, 2.0)]
    writer.close()


def test_resumed_log_continues_elapsed_seconds(tmp_path):
    from experiments.common import MetricWriter

    rows = [{"step": 5, "elapsed_s": 100.0}, {"step": 10, "elapsed_s": 200.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    writer = MetricWriter(str(tmp_path), resume_step=5)  # step 10 came after the last checkpoint
    writer.write(10, {"train/loss": 1.0})
    writer.close()
    kept, new = _rows(tmp_path)
    assert kept == rows[0] and new["step"] == 10 and 100.0 <= new["elapsed_s"] < 150.0


def test_wandb_logs_offline_and_is_needed_only_when_asked(tmp_path, monkeypatch):
    import sys

    from experiments.common import MetricWriter

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricWriter(str(tmp_path), wandb_project="gpt-jax-test", config={"train": {"steps": 2}})
    writer.write(1, {"train/loss": 3.0})
    writer.close()
    run_dirs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(run_dirs) == 1
    run_id = (tmp_path / "wandb_id").read_text()
    assert run_dirs[0].endswith(run_id)
    assert os.listdir(tmp_path / "wandb" / run_dirs[0] / "files")

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    MetricWriter(str(tmp_path)).close()  # off by default: never imported
    with pytest.raises(ValueError, match="train.wandb='p' needs the wandb package"):
        MetricWriter(str(tmp_path), wandb_project="p")


def test_plot_draws_each_runs_train_and_eval_loss(tmp_path):
    """In its own process: the programs' absl flags (--workdir in each) cannot share one."""
    runs = {"a": [{"step": 5, "train/loss": 3.0}, {"step": 10, "train/loss": 2.0, "eval/loss": 2.5}],
            "b": [{"step": 5, "train/loss": 3.5, "eval/loss": 3.6}, {"step": 10, "train/loss": 2.8}]}
    for name, rows in runs.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = ("import json, sys\nfrom experiments.plot import plot_runs\n"
            "fig = plot_runs(sys.argv[1:])\n"
            "print(json.dumps({l.get_label(): [list(map(float, l.get_xdata())), list(map(float, l.get_ydata()))]"
            " for l in fig.axes[0].lines}))\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a"), str(tmp_path / "b")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = json.loads(result.stdout.strip().splitlines()[-1])
    assert lines == {"a train": [[5, 10], [3.0, 2.0]], "a eval": [[10], [2.5]],
                     "b train": [[5, 10], [3.5, 2.8]], "b eval": [[5], [3.6]]}


def test_plot_program_writes_a_png(every_step, intervals, tmp_path):
    out = tmp_path / "both.png"
    result = run("experiments.plot", f"--workdir={every_step[0]}", intervals[0], f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {out}" in result.stdout
