"""Benchmark the train step, sampling and the data pipeline on this machine, optionally
beside Hugging Face's PyTorch GPT-2 on the same shapes in the same run.

python -m experiments.bench --config=configs/gpt2.py:small \
    --config.data.seq_len=512 --config.data.batch_size=4 [--peer] [--compile_peer] \
    [--what=train,sample,data] [--repeats=5] [--rounds=1] [--out=FILE.json]

Shapes come from the config (model.*, data.seq_len, data.batch_size). Dropout is off and
train.grad_accum_steps is forced to 1, as in the peer: one step is one forward+backward
of the whole batch plus the optimizer update. Shared machines drift, so compare ratios
measured in one run, not absolute figures across runs.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import common
from gpt import data, flops
from gpt.config import validate
from gpt.model import GPT
from gpt.optim import make_optimizer
from gpt.parallel import make_steps
from gpt.train_step import create_state

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WHAT = flags.DEFINE_list("what", ["train", "sample", "data"], "What to measure: train, sample, data.")
_PEER = flags.DEFINE_bool("peer", False, "Also run Hugging Face's PyTorch GPT-2 (eager) on the same shapes.")
_COMPILE_PEER = flags.DEFINE_bool("compile_peer", False, "Also run the peer under torch.compile (implies --peer).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions after warm-up; medians are reported.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed repetitions first.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 1, "Train: time ours and then each peer, this many times in turn; each ratio is "
    "the median of the rounds' ratios, so that a shared machine's drift hits both sides.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Sampling: prompt tokens (batch 1, greedy).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Sampling: new tokens per prompt.")
_CPUS = flags.DEFINE_integer(
    "cpus", 0, "Pin ours and the peer to this many CPUs (0: all). On a shared machine 1 keeps "
    "the ratio honest: a busy machine slows a 2-thread runtime by how it waits, not by its work.")
_OUT = flags.DEFINE_string("out", "", "JSON results file; default bench_results/<timestamp>.json.")

PEER_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           os.pardir, "shared", "bench", "peer_hf.py")
WHATS = ("train", "sample", "data")
SAMPLING_MISSING = "sampling: gpt/sampling.py not available"


def _timed(fn, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` (which must block) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _peak_memory_mb() -> tuple[float, str]:
    """The device's own peak where it reports one (GPU, TPU); on CPU the process's peak RSS,
    which also counts the runtime, the compiler and the host copies."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
    return _vm_hwm_kb() / 1024, "process peak RSS (VmHWM)"


def _vm_hwm_kb() -> int:
    """This process's peak RSS since exec. getrusage's would include the parent's size at
    fork, which Linux carries into the child: a bench started from a large process reads high."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def as_benchmarked(config):
    """(a copy of `config` as the peer runs it: one micro-batch, no dropout, its model)."""
    config = config.copy_and_resolve_references()
    config.train.grad_accum_steps = 1
    config.model.embd_pdrop = config.model.resid_pdrop = config.model.attn_pdrop = 0.0
    return config, GPT(validate(config), common.kernels(config)[0])


def random_batch(config, rng: np.random.Generator):
    """Uniform token ids, as the peer uses: speed does not depend on the text."""
    tokens = rng.integers(0, config.model.vocab_size,
                          (config.data.batch_size, config.data.seq_len + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def bench_train(config, model: GPT, state, schedule, peak_flops: float, warmup: int,
                repeats: int, rounds: int = 1, between_rounds=lambda: None) -> tuple[dict, object]:
    """tokens/s, FLOP/s and MFU of one jitted train step, lowering and compilation timed
    apart, in `rounds` rounds of `warmup` + `repeats` steps with `between_rounds()` after each
    (the peers' turns); returns (results, the final state), as the step donates its state."""
    steps = make_steps(model, schedule, "jit", accum_steps=1,
                       compiler_options=common.kernels(config)[1])
    batch = jax.device_put(random_batch(config, np.random.default_rng(0)))
    start = time.perf_counter()
    lowered = steps.train.lower(state, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start

    faults = []

    def step():
        nonlocal state
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        state, metrics = compiled(state, batch)  # the state is donated: always pass the newest
        jax.block_until_ready(metrics)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    round_times = []
    for _ in range(rounds):
        round_times.append(_timed(step, warmup, repeats))
        between_rounds()
    median = statistics.median(statistics.median(times) for times in round_times)
    tokens = config.data.batch_size * config.data.seq_len
    n_params = flops.count_params(state.params)
    per_token = flops.flops_per_token(model.cfg, n_params, config.data.seq_len)
    memory_mb, memory_source = _peak_memory_mb()
    return {"tokens_per_s": tokens / median, "median_step_s": median,
            "step_times_s": [t for times in round_times for t in times],
            "round_tokens_per_s": [tokens / statistics.median(times) for times in round_times],
            "model_flops_per_s": tokens / median * per_token,
            "mfu": flops.mfu(tokens / median, per_token, peak_flops),
            "flops_per_token": per_token, "params": n_params, "tokens_per_step": tokens,
            "lower_s": lower_s, "compile_s": compile_s,
            # 4 KiB page faults on fresh temporaries cost much of a CPU step without huge pages
            "page_faults_per_step": statistics.median(faults[-repeats:]),
            "peak_memory_mb": memory_mb, "memory_source": memory_source}, state


def bench_sample(model: GPT, params, prompt_len: int, new_tokens: int, warmup: int,
                 repeats: int) -> dict:
    """Greedy new tokens/s for one prompt (batch 1), prefill included, as Hugging Face's
    `generate` is timed; the first call (compilation) is reported apart."""
    if importlib.util.find_spec("gpt.sampling") is None:
        return {"skipped": SAMPLING_MISSING}
    from gpt.sampling import generate  # pylint: disable=import-outside-toplevel
    if prompt_len + new_tokens > model.cfg.max_len:
        raise ValueError(f"--prompt_len + --new_tokens = {prompt_len + new_tokens} is not allowed: "
                         f"at most model.max_len={model.cfg.max_len}")
    prompt = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, prompt_len))
    run = lambda: generate(model, params, prompt.tolist(), max_new_tokens=new_tokens,  # noqa: E731
                           rng=jax.random.PRNGKey(0), temperature=0.0)
    first_call_s = _timed(run, 0, 1)[0]
    times = _timed(run, max(warmup - 1, 0), repeats)
    median = statistics.median(times)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    bandwidth = flops.measure_matvec_bandwidth(cols=model.cfg.d_model, dtype=model.cfg.param_dtype)
    return {"tokens_per_s": new_tokens / median, "median_s": median, "times_s": times,
            "first_call_s": first_call_s, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "weight_bytes": weight_bytes, "weights_read_bytes_per_s": new_tokens / median * weight_bytes,
            "matvec_bandwidth_bytes_per_s": bandwidth,
            # each new token reads every weight once: no batch-1 decoder here can beat this
            "memory_bound_tokens_per_s": bandwidth / weight_bytes}


def bench_data(config, warmup: int, repeats: int, batches_per_repeat: int = 20) -> dict:
    """tokens/s of the train iterator (tokenize, pack, batch) on `data.name`; preparing the
    corpus and the tokenizer, and starting the workers, happen in the untimed warm-up."""
    it = data.make_train_iterator(config.data, seed=config.train.seed)
    times = _timed(lambda: [next(it) for _ in range(batches_per_repeat)], warmup, repeats)
    it.close()
    tokens = batches_per_repeat * config.data.batch_size * config.data.seq_len
    return {"tokens_per_s": tokens / statistics.median(times), "times_s": times,
            "tokens_per_repeat": tokens, "corpus": config.data.name, "tokenizer": config.data.tokenizer,
            "num_workers": config.data.num_workers, "prefetch": config.data.prefetch}


# Runs the peer script, then prints its peak RSS in kB the way `_vm_hwm_kb` reads ours.
_PEER_WRAPPER = ("import re, runpy, sys; sys.argv = sys.argv[1:]; "
                 "runpy.run_path(sys.argv[0], run_name='__main__'); "
                 "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")


def run_peer(config, what: str, compile_: bool, warmup: int, repeats: int,
             prompt_len: int, new_tokens: int, threads: int = 0) -> dict:
    """One measurement of ../shared/bench/peer_hf.py in a subprocess, plus its peak RSS;
    `threads` > 0 sets torch's threads, else torch keeps its default."""
    if not os.path.isfile(PEER_SCRIPT):
        raise FileNotFoundError(f"--peer needs {os.path.normpath(PEER_SCRIPT)}, which is missing")
    m = config.model
    cmd = [sys.executable, "-c", _PEER_WRAPPER, PEER_SCRIPT, what, f"--layers={m.n_layer}",
           f"--d-model={m.d_model}", f"--heads={m.n_head}", f"--vocab={m.vocab_size}",
           f"--seq={config.data.seq_len}", f"--batch={config.data.batch_size}",
           f"--prompt={prompt_len}", f"--new={new_tokens}", f"--warmup={warmup}",
           f"--repeats={repeats}", f"--threads={threads}"] + (["--compile"] if compile_ else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise OSError(f"the peer failed (exit {proc.returncode}): {last} "
                      f"(it needs torch and transformers: make setup-dev)")
    *_, line, peak_kb = proc.stdout.strip().splitlines()
    result = json.loads(line)
    result["peak_memory_mb"] = int(peak_kb) / 1024
    result["memory_source"] = "process peak RSS (VmHWM)"
    return result


def _shape_line(config, model: GPT) -> str:
    c = model.cfg
    return (f"{c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads, d_ff {c.d_ff}, vocab "
            f"{c.vocab_size}, seq {config.data.seq_len}, batch {config.data.batch_size}, {c.dtype}")


def table(results: dict) -> str:
    """The results as aligned rows, one per (what, who), with ours / peer ratios."""
    head = (f"{'':<22}{'tokens/s':>10}{'GFLOP/s':>10}{'MFU':>7}{'compile s':>11}"
            f"{'peak MB':>9}{'ours/peer':>11}")
    lines = [f"shape: {results['shape']}", f"notes: {'; '.join(results['notes'])}",
             f"matmul peak (this run): {results['matmul_peak_flops'] / 1e9:.1f} GFLOP/s", head]
    for what in WHATS:
        if what not in results:
            continue
        ours = results[what]
        if "skipped" in ours:
            lines.append(f"{what + ' ours':<22}{ours['skipped']}")
            continue
        rows = [("ours", ours)] + [(name, r[what]) for name, r in results.get("peers", {}).items()
                                   if what in r]
        for who, r in rows:
            flops_s, mfu = r.get("model_flops_per_s"), r.get("mfu")
            compile_s = r.get("compile_s", r.get("first_call_s"))
            ratio = results["ratios"].get(f"{what}/{who}")
            lines.append(
                f"{what + ' ' + who:<22}{r['tokens_per_s']:>10.1f}"
                + (f"{flops_s / 1e9:>10.1f}" if flops_s else f"{'':>10}")
                + (f"{mfu:>7.1%}" if mfu else f"{'':>7}")
                + (f"{compile_s:>11.1f}" if compile_s is not None else f"{'':>11}")
                + (f"{r['peak_memory_mb']:>9.0f}" if "peak_memory_mb" in r else f"{'':>9}")
                + (f"{ratio:>10.2f}x" if ratio else ""))
        if what == "train" and "page_faults_per_step" in ours:
            lines.append(f"{'train page faults':<22}{ours['page_faults_per_step']:>10.0f}  per step, "
                         f"ours (GLIBC_TUNABLES={results['machine'].get('glibc_tunables') or 'unset'})")
        if what == "sample":
            lines.append(
                f"{'sample bound':<22}{ours['memory_bound_tokens_per_s']:>10.1f}  every weight "
                f"({ours['weight_bytes'] / 1e6:.0f} MB) read once per token at the matrix-vector "
                f"bandwidth measured now, {ours['matvec_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
                f"(ours reads {ours['weights_read_bytes_per_s'] / 1e9:.1f} GB/s)")
    return "\n".join(lines)


def run(config, what, *, peers=(), warmup: int = 2, repeats: int = 5, rounds: int = 1,
        prompt_len: int = 32, new_tokens: int = 128, cpus: int = 0) -> dict:
    """All requested measurements as one JSON-able dict; `peers` names the peer runs
    ("hf-torch", "hf-torch-compile"), which take their train turns between ours, `rounds`
    times. `cpus` > 0 pins this process, and so the peer, to that many CPUs; it must come
    before jax starts its thread pool."""
    if cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    unknown = [w for w in what if w not in WHATS]
    if unknown:
        raise ValueError(f"--what={','.join(what)} is not allowed: a list of {', '.join(WHATS)}")
    if repeats < 1 or warmup < 0 or rounds < 1:
        raise ValueError("--repeats and --rounds must be at least 1 and --warmup at least 0")
    config, model = as_benchmarked(config)
    if peers and (model.cfg.d_ff != 4 * model.cfg.d_model or not model.cfg.tie_embeddings):
        raise ValueError(f"--peer is not allowed with model.d_ff={model.cfg.d_ff} or untied "
                         f"embeddings: the peer is GPT-2 (d_ff = 4 x d_model, tied embeddings)")
    tx, schedule = make_optimizer(config.optim, config.train.steps, model.ops)
    state = create_state(model, tx, config.train.seed, config.data.seq_len)
    device = jax.devices()[0]
    results = {
        "shape": _shape_line(config, model), "model": dataclasses.asdict(model.cfg),
        "seq_len": config.data.seq_len, "batch_size": config.data.batch_size,
        "notes": ["train.grad_accum_steps forced to 1", "dropout off", f"medians of {repeats} "
                  f"after {warmup} warm-up", "uniform random tokens for train and sample"]
                 + ([f"train: {rounds} rounds, ours then each peer; medians of the rounds"]
                    if rounds > 1 else [])
                 + ([f"ours and the peer pinned to {cpus} CPU(s)"] if cpus else []),
        "machine": {"platform": device.platform, "device_kind": device.device_kind,
                    "cpus": len(os.sched_getaffinity(0)), "host": platform.node(),
                    "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "matmul_peak_flops": flops.measure_matmul_flops(
            dtype=model.cfg.dtype, ops=model.ops, compiler_options=common.kernels(config)[1]),
        "ratios": {},
    }
    peer_rounds = {}  # (what, peer) -> each round's result

    def peer_turn(w: str) -> None:
        for name in peers:
            if w == "sample" and name == "hf-torch-compile":
                continue  # peer_hf.py compiles only its train step
            peer_rounds.setdefault((w, name), []).append(run_peer(
                config, w, name == "hf-torch-compile", warmup, repeats, prompt_len, new_tokens,
                threads=cpus))

    if "train" in what:
        results["train"], state = bench_train(config, model, state, schedule,
                                              results["matmul_peak_flops"], warmup, repeats,
                                              rounds, lambda: peer_turn("train"))
    if "sample" in what:
        results["sample"] = bench_sample(model, state.params, prompt_len, new_tokens, warmup, repeats)
        if "skipped" not in results["sample"]:
            peer_turn("sample")
    if "data" in what:
        results["data"] = bench_data(config, warmup, repeats)

    for (w, name), turns in peer_rounds.items():
        ours = results[w].get("round_tokens_per_s", [results[w]["tokens_per_s"]])
        r = dict(sorted(turns, key=lambda t: t["tokens_per_s"])[(len(turns) - 1) // 2])
        r["tokens_per_s"] = statistics.median(t["tokens_per_s"] for t in turns)
        r["round_tokens_per_s"] = [t["tokens_per_s"] for t in turns]
        if w == "train":  # the same FLOPs per token and peak as ours
            r["model_flops_per_s"] = r["tokens_per_s"] * results["train"]["flops_per_token"]
            r["mfu"] = r["model_flops_per_s"] / results["matmul_peak_flops"]
        results.setdefault("peers", {}).setdefault(name, {})[w] = r
        results["ratios"][f"{w}/{name}"] = statistics.median(
            a / t["tokens_per_s"] for a, t in zip(ours, turns))
    return results


def main(argv):
    common.require_config(argv, _CONFIG.value, "configs/gpt2.py:small")
    peers = (["hf-torch"] if _PEER.value or _COMPILE_PEER.value else []) + (
        ["hf-torch-compile"] if _COMPILE_PEER.value else [])
    out = _OUT.value or os.path.join("bench_results", time.strftime("%Y%m%d-%H%M%S") + ".json")
    results = run(_CONFIG.value, _WHAT.value, peers=peers, warmup=_WARMUP.value,
                  repeats=_REPEATS.value, rounds=_ROUNDS.value, prompt_len=_PROMPT_LEN.value,
                  new_tokens=_NEW_TOKENS.value, cpus=_CPUS.value)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    common.write_json_atomic(out, results)
    print(table(results))
    print(f"results: {out}")


if __name__ == "__main__":
    common.run_program(main)
