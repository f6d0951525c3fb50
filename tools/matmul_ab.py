"""The train step's matrix products one by one, on XLA's CPU dots (the options make_steps
compiles with), on gpt/cpu/matmul.py's MKL kernel and, where torch is installed, on torch's CPU
matmul (MKL, as Hugging Face's peer runs it), interleaved: best times of --repeats, twice over.
How gpt/cpu/matmul.py was chosen. Give it GLIBC_TUNABLES=glibc.malloc.hugetlb=1 as the programs run.

python tools/matmul_ab.py --config=configs/gpt2.py:small --config.data.seq_len=512 \
    --config.data.batch_size=4 [--repeats=12]
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import bench  # noqa: E402  (its --config and --repeats flags too)
from gpt.cpu import build, matmul  # noqa: E402
from gpt.cpu.compiler import CPU_COMPILER_OPTIONS  # noqa: E402


def _products(cfg, rows):
    """(name, a shape, b shape, transpose_a, transpose_b, times per step) of every product of
    a train step: each dense layer's forward, input gradient and weight gradient, then the tied
    head's (x @ table.T; dlogits @ table; dlogits.T @ x)."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    out = []
    for name, n_in, n_out in [("c_attn", d, 3 * d), ("attn c_proj", d, d), ("c_fc", d, f),
                              ("mlp c_proj", f, d)]:
        out += [(f"{name} forward", (rows, n_in), (n_in, n_out), False, False, cfg.n_layer),
                (f"{name} d input", (rows, n_out), (n_in, n_out), False, True, cfg.n_layer),
                (f"{name} d weight", (rows, n_in), (rows, n_out), True, False, cfg.n_layer)]
    return out + [("head forward", (rows, d), (v, d), False, True, 1),
                  ("head d input", (rows, v), (v, d), False, False, 1),
                  ("head d table", (rows, v), (rows, d), True, False, 1)]


def _best(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _sides(ta, tb):
    """name -> (a, b) -> the product, run to completion."""
    def xla(a, b):
        return (a.T if ta else a) @ (b.T if tb else b)
    sides = {"xla": jax.jit(xla, compiler_options=CPU_COMPILER_OPTIONS),
             "mkl kernel": jax.jit(lambda a, b: matmul.matmul(a, b, ta, tb))}
    sides = {k: (lambda f: lambda a, b: f(a, b).block_until_ready())(f) for k, f in sides.items()}
    try:
        import torch
        torch.set_num_threads(os.cpu_count())
        sides["torch"] = lambda a, b: xla(torch.from_numpy(a), torch.from_numpy(b))
    except ImportError:
        pass
    return sides


def main(_):
    build.require("matmul")
    if not matmul.loaded():
        raise SystemExit("the matmul kernel needs MKL (pip install mkl) on x86-64 Linux")
    config, model = bench.as_benchmarked(bench._CONFIG.value)  # pylint: disable=protected-access
    repeats = bench._REPEATS.value  # pylint: disable=protected-access
    rng = np.random.default_rng(0)
    totals = {}
    for name, a_shape, b_shape, ta, tb, count in _products(
            model.cfg, config.data.batch_size * config.data.seq_len):
        a, b = (rng.standard_normal(s, np.float32) for s in (a_shape, b_shape))
        m, k = a_shape[::-1] if ta else a_shape
        n = b_shape[0] if tb else b_shape[1]
        sides = _sides(ta, tb)
        on_device = (jax.device_put(a), jax.device_put(b))
        arrays = {"xla": on_device, "mkl kernel": on_device, "torch": (a, b)}
        best = {side: float("inf") for side in sides}
        for _ in range(2):
            for side, fn in sides.items():
                best[side] = min(best[side], _best(lambda: fn(*arrays[side]), repeats))  # noqa: B023
        for side, t in best.items():
            totals[side] = totals.get(side, 0.0) + count * t
        shapes = f"[{m}x{k}] @ [{k}x{n}]"
        print(f"{name:<21}{shapes:<26} x{count:<3}"
              + "".join(f"{side:>12} {2 * m * k * n / t / 1e9:6.1f}" for side, t in best.items())
              + "  GFLOP/s", flush=True)
    print("per step:" + "".join(f"  {side} {t:.3f} s" for side, t in totals.items()))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
