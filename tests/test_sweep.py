"""Sweeps: axes into named runs, dry-run commands, and a sweep of 4 tiny runs through the CLI:
one launched by hand from --dry_run, one interrupted and resumed, two that diverge."""
import csv
import json
import math
import os
import shlex
import subprocess
import sys

import ml_collections
import pytest

from configs.sweeps import gpt1_vs_gpt2
from gpt import sweeps
from tests.helpers import ROOT, run

TINY = (("train.steps", 20), ("model.n_layer", 1), ("model.d_model", 32), ("model.d_ff", 64),
        ("model.max_len", 32), ("data.seq_len", 32), ("data.batch_size", 8), ("train.log_every", 5),
        ("train.eval_every", 10), ("train.eval_steps", 2), ("train.ckpt_every", 10),
        ("train.peak_flops", 1e12))
NAMES = ["lr=0.001,norm_position=pre", "lr=0.001,norm_position=post",
         "lr=10000.0,norm_position=pre", "lr=10000.0,norm_position=post"]


def sweep_config(**fields):
    c = ml_collections.ConfigDict()
    c.base = "configs/gpt2.py:tiny"
    c.update(fields)
    return c


def test_product_and_zip_name_runs_in_axis_order():
    runs = sweeps.expand(sweep_config(
        overrides=(("train.steps", 20),),
        zip=(("model.norm_position", ("post", "pre")), ("model.final_norm", (False, True))),
        product=(("model.n_layer", (2, 6)), ("optim.lr", (1e-3,)))))
    assert [r.name for r in runs] == [
        "norm_position=post,final_norm=False,n_layer=2,lr=0.001",
        "norm_position=post,final_norm=False,n_layer=6,lr=0.001",
        "norm_position=pre,final_norm=True,n_layer=2,lr=0.001",
        "norm_position=pre,final_norm=True,n_layer=6,lr=0.001"]
    assert runs[1].overrides == (("train.steps", 20), ("model.norm_position", "post"),
                                 ("model.final_norm", False), ("model.n_layer", 6), ("optim.lr", 1e-3))
    assert runs[1].varied == runs[1].overrides[1:]


def test_variants_seeds_and_safe_names():
    runs = sweeps.expand(sweep_config(
        variants=(("gpt1", {}), ("pre_ln", {"model.norm_position": "pre", "model.final_norm": True})),
        product=(("train.seed", (0, 1)), ("data.data_dir", ("/tmp/x y",)))))
    assert [r.name for r in runs] == [
        "gpt1,seed=0,data_dir=_tmp_x_y", "gpt1,seed=1,data_dir=_tmp_x_y",
        "pre_ln,seed=0,data_dir=_tmp_x_y", "pre_ln,seed=1,data_dir=_tmp_x_y"]
    assert runs[2].varied[:2] == (("model.norm_position", "pre"), ("model.final_norm", True))
    assert sweeps.expand(sweep_config())[0].name == "base"
    # two keys ending alike keep their whole paths
    names = [r.name for r in sweeps.expand(sweep_config(product=(("a.seed", (0,)), ("b.seed", (1,)))))]
    assert names == ["a.seed=0,b.seed=1"]


@pytest.mark.parametrize("fields, needle", [
    (dict(base=""), "base"),
    (dict(product=(("model.n_layer", ()),)), "no values"),
    (dict(product=("model.n_layer",)), "pairs"),
    (dict(zip=(("model.n_layer", (2, 6)), ("optim.lr", (1e-3,)))), "one length"),
    (dict(overrides=(("model.n_layer", 2),), product=(("model.n_layer", (2, 6)),)), "model.n_layer set twice"),
    (dict(variants=(("a", {"optim.lr": 1.0}),), product=(("optim.lr", (1.0,)),)), "optim.lr set twice"),
    (dict(variants=(("a/b", {}), ("a_b", {}))), "a_b"),
])
def test_ill_formed_sweeps_are_one_readable_error(fields, needle):
    with pytest.raises(ValueError, match=needle):
        sweeps.expand(sweep_config(**fields))


def test_select_by_glob_or_regex():
    runs = [sweeps.Run(name, (), ()) for name in NAMES]
    assert [r.name for r in sweeps.select(runs, "*post*")] == [NAMES[1], NAMES[3]]
    assert [r.name for r in sweeps.select(runs, "^lr=0.001")] == NAMES[:2]
    assert [r.name for r in sweeps.select(runs, "lr=1.*pre$")] == [NAMES[2]]
    assert [r.name for r in sweeps.select(runs, "?r=0.001,*")] == NAMES[:2]  # not a regex: a glob
    assert sweeps.select(runs, "nothing") == []


def test_progress_and_summary_from_records():
    done = [{"step": 10, "train/loss": 3.0, "train/tokens_per_s": 100.0, "eval/loss": 3.5},
            {"step": 20, "train/loss": 2.0, "train/tokens_per_s": 300.0, "eval/loss": 2.5}]
    diverged = done[:1] + [{"step": 15, "train/loss": math.nan, "train/grad_norm": math.nan, "diverged": True}]
    assert [sweeps.progress(r, 20) for r in ([], done[:1], done, diverged)] == [
        "new", "partial", "done", "diverged"]
    config = {"model": {"n_layer": 1, "d_model": 32, "n_head": 4, "d_ff": 64, "vocab_size": 257,
                        "max_len": 32}, "train": {"steps": 20}}
    run = sweeps.Run("x", (), (("optim.lr", 1.0),))
    row = sweeps.summarize(run, config, done)
    assert row["parameters"] == 9_248 + 8_544 + 64  # wte + wpe, one block, ln_f
    assert (row["final_eval_loss"], row["best_eval_loss"], row["tokens_per_s"]) == (2.5, 2.5, 200.0)
    assert row["overrides"] == "optim.lr=1.0" and row["diverged_at_step"] is None
    row = sweeps.summarize(run, config, diverged)
    assert row["diverged_at_step"] == 15 and math.isnan(row["final_train_loss"])
    assert math.isnan(row["final_eval_loss"]) and row["best_eval_loss"] == 3.5


@pytest.mark.parametrize("spec, n", [("norm_placement.py:tiny", 8), ("norm_placement.py", 8),
                                     ("gpt1_vs_gpt2.py:tiny", 6), ("gpt1_vs_gpt2.py", 6)])
def test_shipped_sweeps_are_valid(tmp_path, spec, n):
    result = run("experiments.sweep", f"--config=configs/sweeps/{spec}", f"--workdir={tmp_path}", "--dry_run")
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    assert len(commands) == n and all(c.startswith("python -m experiments.train ") for c in commands)
    assert sorted(os.listdir(tmp_path)) == [".lock", "launch"]  # the lock, the launch scripts, no run


def test_dry_run_launch_scripts_split_the_runs_across_hosts(tmp_path):
    spec = "configs/sweeps/gpt1_vs_gpt2.py:tiny"
    result = run("experiments.sweep", f"--config={spec}", f"--workdir={tmp_path}", "--dry_run", "--hosts=4",
                 "--parallel=2")
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    launch = tmp_path / "launch"
    assert sorted(os.listdir(launch)) == [f"host_{i}.sh" for i in range(4)] + ["slurm_array.sh"]
    names = [shlex.split(c)[4].removeprefix(f"--workdir={tmp_path}/") for c in commands]
    runs = sweeps.expand(gpt1_vs_gpt2.get_config("tiny"))
    chosen = []
    for i in range(4):
        sweep_line = (launch / f"host_{i}.sh").read_text().splitlines()[-1]
        args = shlex.split(sweep_line)
        assert args[:3] == ["python", "-m", "experiments.sweep"] and "--parallel=2" in args
        only = next(a.removeprefix("--only=") for a in args if a.startswith("--only="))
        chosen += [r.name for r in sweeps.select(runs, only)]
    assert sorted(chosen) == sorted(names)  # every run on exactly one host
    slurm = (launch / "slurm_array.sh").read_text()
    assert f"#SBATCH --array=0-{len(commands) - 1}" in slurm
    assert [shlex.split(line)[0] for line in slurm.splitlines() if line.startswith("  ")] == commands


def write_sweep(path, overrides):
    path.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.base = 'configs/gpt2.py:tiny'\n"
        f"    c.overrides = {overrides!r}\n"
        "    c.product = (('optim.lr', (1e-3, 1e4)), ('model.norm_position', ('pre', 'post')))\n"
        "    return c\n")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The 4-run sweep, in stages: one run by hand from --dry_run's command, the post-LN runs
    with --only, an interruption of one of them, then the whole sweep."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec = tmp / "tiny_sweep.py"
    write_sweep(spec, (("data.data_dir", str(tmp / "data")),) + TINY)
    workdir = str(tmp / "w")
    args = [f"--config={spec}", f"--workdir={workdir}"]
    stages = {"dry_run": run("experiments.sweep", *args, "--dry_run")}
    assert stages["dry_run"].returncode == 0, stages["dry_run"].stderr
    by_hand = shlex.split(stages["dry_run"].stdout.splitlines()[0])
    assert by_hand[:3] == ["python", "-m", "experiments.train"]
    stages["by_hand"] = run(*by_hand[2:])
    stages["only_post"] = run("experiments.sweep", *args, "--only=*post")

    # Interrupt the healthy post-LN run after its step-10 checkpoint, as a kill would leave it.
    post = os.path.join(workdir, NAMES[1])
    with open(os.path.join(post, "metrics.jsonl")) as f:
        kept = [line for line in f if json.loads(line)["step"] <= 10]
    with open(os.path.join(post, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    os.rename(os.path.join(post, "checkpoints", "20"), os.path.join(tmp, "removed_checkpoint"))
    untouched = {name: os.stat(os.path.join(workdir, name, "metrics.jsonl")).st_mtime_ns
                 for name in (NAMES[0], NAMES[3])}
    stages["all"] = run("experiments.sweep", *args)
    return workdir, args, stages, untouched


def test_dry_run_commands_make_the_sweeps_runs(swept):
    workdir, _, stages, _ = swept
    assert stages["by_hand"].returncode == 0, stages["by_hand"].stderr[-3000:]
    commands = stages["dry_run"].stdout.splitlines()
    assert [shlex.split(c)[4].removeprefix(f"--workdir={workdir}/") for c in commands] == NAMES
    assert "--config.optim.lr=10000.0" in commands[2] and "--config.model.norm_position=pre" in commands[2]
    for command in commands:  # the sweep launches exactly these
        assert command in stages["only_post"].stdout + stages["all"].stdout or command == commands[0]
    config = json.load(open(os.path.join(workdir, NAMES[0], "config.json")))
    assert config["optim"]["lr"] == 1e-3 and config["model"]["norm_position"] == "pre"
    assert config["model"]["d_model"] == 32 and config["train"]["steps"] == 20


def test_restart_skips_finished_runs_and_resumes_interrupted_ones(swept):
    workdir, _, stages, untouched = swept
    assert stages["only_post"].returncode == 0, stages["only_post"].stderr[-3000:]
    assert "[1/2] lr=0.001,norm_position=post: starting" in stages["only_post"].stdout
    out = stages["all"].stdout
    assert stages["all"].returncode == 0, stages["all"].stderr[-3000:]
    assert f"[1/4] {NAMES[0]}: done, skipped" in out
    assert f"[2/4] {NAMES[1]}: resuming" in out and "resuming from step 10" in out
    assert f"[3/4] {NAMES[2]}: starting" in out
    assert f"[4/4] {NAMES[3]}: diverged, skipped" in out
    for name, mtime in untouched.items():
        assert os.stat(os.path.join(workdir, name, "metrics.jsonl")).st_mtime_ns == mtime, name
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, NAMES[1], "metrics.jsonl"))]
    assert steps == [5, 10, 15, 20]


def test_diverged_runs_are_reported_not_crashes(swept):
    workdir, _, stages, _ = swept
    assert "diverged at step" in stages["only_post"].stdout and "diverged at step" in stages["all"].stdout
    for name in NAMES[2:]:
        last = json.loads(open(os.path.join(workdir, name, "metrics.jsonl")).readlines()[-1])
        assert last["diverged"] and math.isnan(last["train/loss"])


def test_report_agrees_with_the_runs_metrics(swept):
    workdir, args, _, _ = swept
    with open(os.path.join(workdir, "report.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [row["run"] for row in rows] == NAMES
    for row in rows:
        records = [json.loads(line) for line in open(os.path.join(workdir, row["run"], "metrics.jsonl"))]
        evals = [r["eval/loss"] for r in records if "eval/loss" in r]
        assert int(row["last_step"]) == records[-1]["step"]
        diverged = records[-1].get("diverged", False)
        assert row["diverged_at_step"] == (str(records[-1]["step"]) if diverged else "")
        if diverged:
            assert row["final_eval_loss"] == "nan"
        else:
            assert float(row["final_train_loss"]) == records[-1]["train/loss"]
            assert float(row["final_eval_loss"]) == records[-1]["eval/loss"] == evals[-1]
            assert float(row["best_eval_loss"]) == min(evals)
            assert int(row["parameters"]) == 17_856
    md = open(os.path.join(workdir, "report.md")).read()
    assert "4 of 4 runs" in md and md.count("| yes (step ") == 2 and md.count("| no |") == 2
    for row in rows:
        assert f"| {row['run']} |" in md
    assert open(os.path.join(workdir, "report.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    os.remove(os.path.join(workdir, "report.csv"))
    again = run("experiments.sweep", *args, "--report_only")
    assert again.returncode == 0 and "report of 4 of 4 runs" in again.stdout, again.stderr
    assert [row["run"] for row in csv.DictReader(open(os.path.join(workdir, "report.csv")))] == NAMES


def test_a_changed_config_is_refused_not_reported_as_done(swept, tmp_path):
    workdir, args, _, _ = swept
    data_dir = json.load(open(os.path.join(workdir, NAMES[0], "config.json")))["data"]["data_dir"]
    spec = tmp_path / "wider.py"
    write_sweep(spec, (("data.data_dir", data_dir),) + tuple((k, 128 if k == "model.d_ff" else v) for k, v in TINY))
    result = run("experiments.sweep", f"--config={spec}", args[1])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "model.d_ff=64, the sweep now gives 128; remove it or use a new --workdir" in lines[0]


def test_a_bad_run_config_stops_the_sweep_before_any_run(tmp_path):
    spec = tmp_path / "bad.py"
    spec.write_text("import ml_collections\n\n\ndef get_config():\n"
                    "    c = ml_collections.ConfigDict()\n    c.base = 'configs/gpt2.py:tiny'\n"
                    "    c.product = (('model.norm_position', ('pre', 'middle')),)\n    return c\n")
    result = run("experiments.sweep", f"--config={spec}", f"--workdir={tmp_path / 'w'}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: run norm_position=middle: model.norm_position")
    assert not os.path.exists(tmp_path / "w")


def test_device_shares_split_the_gpus_without_overlap():
    """In a subprocess: experiments.sweep defines absl flags that other programs' modules define too."""
    split = ("import json; from experiments.sweep import device_shares; "
             "print(json.dumps([s.env['CUDA_VISIBLE_DEVICES'] for s in device_shares({}, {})]))")
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    result = subprocess.run([sys.executable, "-c", split.format(2, env)], capture_output=True, text=True,
                            cwd=ROOT)
    assert json.loads(result.stdout) == ["0,1", "2,3"], result.stderr
    result = subprocess.run([sys.executable, "-c", split.format(5, env)], capture_output=True, text=True,
                            cwd=ROOT)
    assert "--parallel=5 is not allowed: at most the 4 GPUs of this host" in result.stderr


def test_parallel_runs_go_side_by_side_on_disjoint_devices_with_sequential_results(swept, tmp_path):
    """The swept fixture's two lr=0.001 runs again, side by side on 2 CPU devices each, from a
    fresh data_dir (the sweep prepares it once, before both start)."""
    workdir, _, _, _ = swept
    spec = tmp_path / "again.py"
    write_sweep(spec, (("data.data_dir", str(tmp_path / "data")),) + TINY)
    side_by_side = run("experiments.sweep", f"--config={spec}", f"--workdir={tmp_path / 'w'}",
                       r"--only=^lr=0\.001,", "--parallel=2", xla_flags="--xla_force_host_platform_device_count=4")
    assert side_by_side.returncode == 0, side_by_side.stderr[-3000:]
    out = side_by_side.stdout
    starts = [line for line in out.splitlines() if ": starting on " in line]
    assert len(starts) == 2 and out.index(starts[1]) < out.index(": done"), out  # both before either ends
    cpus = [set(line.split(" on CPUs ")[1].split(" (")[0].split(",")) for line in starts]
    assert not cpus[0] & cpus[1] and all("(2 host devices)" in line for line in starts)
    for name in NAMES[:2]:
        records = {}
        for where in (workdir, tmp_path / "w"):
            with open(os.path.join(where, name, "metrics.jsonl")) as f:
                records[where] = [{k: v for k, v in json.loads(line).items() if "loss" in k} for line in f]
        assert records[tmp_path / "w"] == records[workdir], name
        assert "final eval loss" in (tmp_path / "w" / name / "train.log").read_text()
    with open(tmp_path / "w" / "report.csv") as f:
        assert [row["run"] for row in csv.DictReader(f)] == NAMES[:2]


@pytest.mark.parametrize("arg", ["", "tiny"])
def test_norm_placement_runs_differ_only_in_where_layernorm_sits(arg):
    """An ablation of one thing: each post-LN run's pre-LN partner differs only in the norm's
    place and the final LN it needs; everything else (GPT-2's init and optimiser) is shared."""
    from configs.sweeps import norm_placement

    runs = sweeps.expand(norm_placement.get_config(arg))
    post = [r for r in runs if ("model.norm_position", "post") in r.varied]
    pre = [r for r in runs if ("model.norm_position", "pre") in r.varied]
    assert len(post) == len(pre) == 4
    for a, b in zip(post, pre):
        assert {key for key, _ in set(a.overrides) ^ set(b.overrides)} == {"model.norm_position", "model.final_norm"}
    assert not any(key.startswith("optim.b") or key == "model.scale_residual_init"
                   for run in runs for key, _ in run.overrides)
