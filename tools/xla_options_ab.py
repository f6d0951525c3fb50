"""The train step compiled under several sets of XLA CPU options, and optionally model
settings, timed interleaved in one process (A B C A B C ...), so a shared machine's drift hits
every variant alike: how gpt/cpu/compiler.py's CPU_COMPILER_OPTIONS were chosen. A variant is
an option set, optionally with model fields after colons, `onednn:attention_block=0`, and
`kernels=` for train.kernels with `+` between kernels: `ours:kernels=none` (XLA's ops),
`ours:kernels=-matmul` (all but MKL's matmul).
With the kernels, the products run on MKL whatever the options. Give it GLIBC_TUNABLES=glibc.malloc.hugetlb=1 to time the steps as the
Makefile runs them (see its HUGE_PAGES).

python tools/xla_options_ab.py --config=configs/gpt2.py:small --config.data.seq_len=512 \
    --config.data.batch_size=4 [--variants=ynnpack,eigen,onednn,ours] [--repeats=5]
"""
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import bench  # noqa: E402  (its --config and --repeats flags too)
from gpt import cpu  # noqa: E402
from gpt.cpu.compiler import CPU_COMPILER_OPTIONS, ONEDNN_DOTS  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.optim import make_optimizer  # noqa: E402
from gpt.config import cpu_kernels  # noqa: E402
from gpt.parallel import make_steps  # noqa: E402
from gpt.train_step import create_state  # noqa: E402

VARIANTS = {
    "ynnpack": {},  # XLA's default: dots (and some reductions) as YNNPACK fusions
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},  # XLA's own Eigen dots
    "onednn": {**ONEDNN_DOTS, "xla_cpu_experimental_ynn_fusion_type": ""},  # oneDNN dots only
    "ours": CPU_COMPILER_OPTIONS,  # what make_steps uses on CPU: oneDNN dots, YNNPACK reductions
}
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS),
                              f"Each one of {', '.join(VARIANTS)}[:model_field=value...].")


def _variant(model: GPT, spec: str) -> tuple[GPT, dict]:
    """(the model with the spec's fields and ops, its compile options)."""
    options, *fields = spec.split(":")
    changes, ops = {}, cpu.ops()
    for field in fields:
        key, value = field.split("=", 1)
        if key == "kernels":
            ops = cpu.ops(kernels=cpu_kernels(value.replace("+", ",")))
            continue
        default = getattr(model.cfg, key)
        changes[key] = value.lower() == "true" if isinstance(default, bool) else type(default)(value)
    return GPT(dataclasses.replace(model.cfg, **changes), ops), VARIANTS[options]


def main(_):
    config, model = bench.as_benchmarked(bench._CONFIG.value)  # pylint: disable=protected-access
    batch = jax.device_put(bench.random_batch(config))
    states, compiled = {}, {}
    for name in _VARIANTS.value:
        variant, options = _variant(model, name)
        tx, schedule = make_optimizer(config.optim, config.train.steps, variant.ops)
        train = make_steps(variant, schedule, "jit", compiler_options={}).train  # XLA's defaults
        states[name] = create_state(variant, tx, config.train.seed, config.data.seq_len)
        compiled[name] = train.lower(states[name], batch).compile(compiler_options=options)
    times = {name: [] for name in compiled}
    for round_ in range(bench._REPEATS.value + 1):  # pylint: disable=protected-access
        for name, step in compiled.items():
            start = time.perf_counter()
            states[name], metrics = step(states[name], batch)
            jax.block_until_ready(metrics)
            if round_:
                times[name].append(time.perf_counter() - start)
    tokens = config.data.batch_size * config.data.seq_len
    base = statistics.median(next(iter(times.values())))
    for name, ts in times.items():
        print(f"{name:<28}{tokens / statistics.median(ts):>10.1f} tokens/s"
              f"{base / statistics.median(ts):>8.2f}x {_VARIANTS.value[0]}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
