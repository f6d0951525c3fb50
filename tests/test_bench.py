"""The benchmark harness end to end on a tiny model: flags, every measurement, the JSON file.
Timings are not checked: they belong to the benchmark, not the tests."""
import json
import statistics
import subprocess
import sys

from tests.helpers import ROOT, run


def test_bench_writes_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    result = run("experiments.bench", "--config=configs/gpt2.py:tiny", "--config.model.n_layer=1",
                 "--config.model.d_model=32", "--config.model.n_head=2", "--config.model.d_ff=64",
                 "--config.model.max_len=16", "--config.data.seq_len=16", "--config.data.batch_size=4",
                 f"--config.data.data_dir={tmp_path / 'data'}", "--prompt_len=4", "--new_tokens=4",
                 "--warmup=0", "--repeats=1", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"shape", "notes", "machine", "matmul_peak_flops", "ratios", "train", "sample", "data"} <= set(results)
    train = results["train"]
    for key in ("tokens_per_s", "model_flops_per_s", "mfu", "lower_s", "compile_s", "peak_memory_mb",
                "memory_source", "step_times_s", "page_faults_per_step"):
        assert key in train, key
    assert len(train["step_times_s"]) == 1 and train["tokens_per_step"] == 64
    assert "tokens_per_s" in results["sample"] or results["sample"]["skipped"].startswith("sampling:")
    assert results["data"]["tokens_per_s"] > 0
    assert "train ours" in result.stdout and "MFU" in result.stdout


TOOL_SHAPE = ("--config=configs/gpt2.py:tiny", "--config.model.n_layer=1", "--config.model.d_model=32",
              "--config.model.n_head=2", "--config.model.d_ff=64", "--config.model.max_len=16",
              "--config.data.seq_len=16", "--config.data.batch_size=4")


def test_op_profile_names_the_model_parts():
    result = run("tools.op_profile", *TOOL_SHAPE, "--steps=1", "--top=3")
    assert result.returncode == 0, result.stderr[-3000:]
    wall, header, *parts = result.stdout.split("\n\n")[0].splitlines()
    assert wall.startswith("wall ") and "ms per step" in wall and header.split() == ["ms/step", "part"]
    # the layer index and the jvp wrappers are gone; forward and backward stay apart
    assert {"tied_head/matmul/ffi_call", "backward tied_head/matmul/ffi_call",
            "cross_entropy/ffi_call", "backward cross_entropy/ffi_call",
            "attn/attention/ffi_call", "backward attn/attention/ffi_call",
            "mlp/c_fc/matmul/ffi_call", "backward mlp/c_fc/matmul/ffi_call"
            } <= {line.split(None, 1)[1] for line in parts}
    assert len(result.stdout.split("\n\n")[1].splitlines()) == 1 + 3  # --top ops


def test_xla_options_ab_times_each_variant():
    variant = "ours:attention_block=8:kernels=none"  # blocks matter without the kernel
    result = run("tools.xla_options_ab", *TOOL_SHAPE, f"--variants=ynnpack,{variant}", "--repeats=1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()[-2:]
    assert [line.split()[0] for line in lines] == ["ynnpack", variant]
    assert lines[0].split()[-2:] == ["1.00x", "ynnpack"]


def test_bench_takes_turns_with_the_peer_and_takes_the_median_ratio(tmp_path):
    # A stand-in peer: 100, 200, 300 tokens/s in its three turns. In a subprocess: bench's
    # flags would clash with another program's imported here.
    peer = tmp_path / "peer.py"
    peer.write_text("import json, pathlib, sys\n"
                    "count = pathlib.Path(__file__).with_suffix('.count')\n"
                    "n = int(count.read_text()) + 1 if count.exists() else 1\n"
                    "count.write_text(str(n))\n"
                    "print(json.dumps({'what': sys.argv[1], 'tokens_per_s': 100.0 * n}))\n")
    code = ("import json, sys\n"
            "from experiments import bench\n"
            "from tests.helpers import tiny_config\n"
            f"bench.PEER_SCRIPT = {str(peer)!r}\n"
            "config = tiny_config(**{'model.d_ff': 128, 'data.seq_len': 8, 'data.batch_size': 2})\n"
            "results = bench.run(config, ['train'], peers=('hf-torch',), warmup=0, repeats=1, rounds=3)\n"
            "print(json.dumps({'ours': results['train'], 'peer': results['peers']['hf-torch']['train'],\n"
            "                  'ratio': results['ratios']['train/hf-torch']}))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    ours = out["ours"]["round_tokens_per_s"]
    assert len(ours) == 3 and out["ours"]["tokens_per_s"] == statistics.median(ours)
    assert out["peer"]["round_tokens_per_s"] == [100.0, 200.0, 300.0]
    assert out["peer"]["tokens_per_s"] == 200.0
    assert out["ratio"] == statistics.median([ours[0] / 100, ours[1] / 200, ours[2] / 300])
