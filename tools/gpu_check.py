"""The GPU benchmark of tools/gpu_check.sh (and `make bench-gpu`): GPT-2 small in bfloat16 at
seq 1024, the train step with each attention, then the project's Hugging Face PyTorch peer
(eager and torch.compile) on the same device, through experiments.bench; one table of
tokens/s, MFU and peak memory, and the targets (MFU >= 50%, >= 1.2x the compiled peer).

python tools/gpu_check.py [--dry_run] [--attention=cudnn,xla] [--batch_size=16] [--out=DIR]

--dry_run: the same runs on this machine's default device (a CPU) at a tiny shape.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_SMALL = ["--config=configs/gpt2.py:small-gpu", "--config.data.seq_len=1024"]
TINY = ["--config=configs/gpt2.py:small-gpu", "--config.model.n_layer=2", "--config.model.d_model=64",
        "--config.model.n_head=2", "--config.model.d_ff=256", "--config.data.seq_len=64"]
TARGET_MFU, TARGET_VS_COMPILED_PEER = 0.50, 1.2


def bench(shape: list[str], attention: str, batch_size: int, peer: bool, timing: list[str],
          out: str) -> dict:
    """One experiments.bench run of the train step; its JSON results."""
    cmd = [sys.executable, "-m", "experiments.bench", *shape, f"--config.model.attention={attention}",
           f"--config.data.batch_size={batch_size}", "--what=train", *timing, f"--out={out}"]
    cmd += ["--peer", "--compile_peer"] if peer else []
    print("+ " + " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd, cwd=ROOT, check=False).returncode:
        sys.exit(f"error: experiments.bench failed at model.attention={attention} (its error is above)")
    with open(out) as f:
        return json.load(f)


def rows(results: dict) -> list[tuple[str, dict]]:
    """(name, train figures) of ours under each attention, then of each peer."""
    out = [(f"ours, attention={attention}", r["train"]) for attention, r in results.items()]
    first = next(iter(results.values()))
    out += [(f"{name} on {r['train'].get('device', 'cpu')}", r["train"])
            for name, r in first.get("peers", {}).items()]
    return out


def summary(results: dict) -> str:
    first = next(iter(results.values()))
    lines = [f"shape: {first['shape']}", f"device: {first['machine']['device_kind']} "
             f"({first['machine']['platform']}), jax {first['machine']['jax']}; MFU against a "
             f"{first['model']['dtype']} matmul measured in the same run: "
             f"{first['matmul_peak_flops'] / 1e9:,.1f} GFLOP/s",
             f"{'':<28}{'tokens/s':>12}{'MFU':>8}{'peak memory':>14}{'compile s':>11}"]
    for name, r in rows(results):
        compile_s = f"{r['compile_s']:>11.1f}" if "compile_s" in r else ""
        lines.append(f"{name:<28}{r['tokens_per_s']:>12,.0f}{r['mfu']:>8.1%}"
                     f"{r['peak_memory_mb'] / 1024:>10.1f} GiB{compile_s}"
                     f"  ({r.get('memory_source', 'peak memory')})")
    compiled = first.get("peers", {}).get("hf-torch-compile", {}).get("train")
    ours_on = "cuda" if first["machine"]["platform"] == "gpu" else "cpu"
    if compiled and compiled.get("device", "cpu") != ours_on:  # a peer without a GPU path
        lines.append(f"the compiled peer ran on {compiled.get('device', 'cpu')}, ours on {ours_on}: no ratio")
        compiled = None
    for attention, r in results.items():
        mfu = r["train"]["mfu"]
        line = (f"attention={attention}: MFU {mfu:.1%} (target {TARGET_MFU:.0%}: "
                f"{'met' if mfu >= TARGET_MFU else 'missed'})")
        if compiled:
            ratio = r["train"]["tokens_per_s"] / compiled["tokens_per_s"]
            line += (f"; {ratio:.2f}x the compiled peer (target {TARGET_VS_COMPILED_PEER}x: "
                     f"{'met' if ratio >= TARGET_VS_COMPILED_PEER else 'missed'})")
        lines.append(line)
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true", help="a tiny shape on this machine's CPU")
    p.add_argument("--attention", default="", help="model.attention values, comma-separated; "
                   "default cudnn,xla (dry run: xla)")
    p.add_argument("--batch_size", type=int, default=0, help="rows per step; default 16 (dry run: 4)")
    p.add_argument("--out", default=os.path.join("bench_results", "gpu_check-" + time.strftime("%Y%m%d-%H%M%S")))
    a = p.parse_args()
    attentions = (a.attention or ("xla" if a.dry_run else "cudnn,xla")).split(",")
    shape = TINY if a.dry_run else GPT2_SMALL
    batch_size = a.batch_size or (4 if a.dry_run else 16)
    timing = ["--warmup=1", "--repeats=2"] if a.dry_run else ["--warmup=3", "--repeats=10"]
    os.makedirs(os.path.join(ROOT, a.out), exist_ok=True)
    results = {attention: bench(shape, attention, batch_size, peer=i == 0, timing=timing,
                                out=os.path.join(a.out, f"train-{attention}.json"))
               for i, attention in enumerate(attentions)}
    text = summary(results)
    with open(os.path.join(ROOT, a.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
