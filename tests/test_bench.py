"""The benchmark harness end to end on a tiny model: flags, every measurement, the JSON file.
Timings are not checked: they belong to the benchmark, not the tests."""
import json

import experiments
from tests.helpers import run


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
    # started with -m, the program re-executed itself asking for huge pages where the kernel
    # grants them on request, and only there
    assert (experiments.TUNABLE + "=1" in results["machine"]["glibc_tunables"]) == experiments._wants_huge_pages()


TOOL_SHAPE = ("--config=configs/gpt2.py:tiny", "--config.model.n_layer=1", "--config.model.d_model=32",
              "--config.model.n_head=2", "--config.model.d_ff=64", "--config.model.max_len=16",
              "--config.data.seq_len=16", "--config.data.batch_size=4")


def test_op_profile_names_the_model_parts():
    result = run("tools.op_profile", *TOOL_SHAPE, "--steps=1", "--top=3")
    assert result.returncode == 0, result.stderr[-3000:]
    wall, header, *parts = result.stdout.split("\n\n")[0].splitlines()
    assert wall.startswith("wall ") and "ms per step" in wall and header.split() == ["ms/step", "part"]
    # the layer index and the jvp wrappers are gone; forward and backward stay apart
    assert {"tied_head/...d,vd->...v/dot_general", "backward tied_head/dot_general",
            "cross_entropy/ffi_call", "backward cross_entropy/ffi_call",
            "attn/attention/ffi_call", "backward attn/attention/ffi_call",
            "mlp/c_fc/dot_general"} <= {line.split(None, 1)[1] for line in parts}
    assert len(result.stdout.split("\n\n")[1].splitlines()) == 1 + 3  # --top ops


def test_xla_options_ab_times_each_variant():
    variant = "ours:attention_block=8:GPT_JAX_FUSED_ATTENTION=0"  # blocks matter without the kernel
    result = run("tools.xla_options_ab", *TOOL_SHAPE, f"--variants=ynnpack,{variant}", "--repeats=1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()[-2:]
    assert [line.split()[0] for line in lines] == ["ynnpack", variant]
    assert lines[0].split()[-2:] == ["1.00x", "ynnpack"]
