"""Where the time goes: the train step, or batch-1 greedy sampling, run under jax.profiler,
with each XLA op's time summed per step (or per new token) and per model part, the part read
from the op's HLO metadata. How gpt/cpu/compiler.py's options and the tied head's einsum were found.
Ops that run concurrently on the thread pool are each counted in full, so the parts can sum
to more than the wall time. Give it GLIBC_TUNABLES=glibc.malloc.hugetlb=1 to run as the
Makefile runs them (see its HUGE_PAGES).

python tools/op_profile.py --config=configs/gpt2.py:small --config.data.seq_len=512 \
    --config.data.batch_size=4 [--of=train|sample] [--steps=2] [--top=15]
"""
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

_DUMP = tempfile.mkdtemp(prefix="op_profile_")
# Before jax starts: the optimised HLO of every compiled module, for the ops' metadata.
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={_DUMP} "
                           "--xla_dump_hlo_as_text").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import bench, common  # noqa: E402  (its --config flag too)
from gpt.optim import make_optimizer  # noqa: E402
from gpt.sampling import generate  # noqa: E402
from gpt.parallel import make_steps  # noqa: E402
from gpt.train_step import create_state  # noqa: E402

_OF = flags.DEFINE_enum("of", "train", ["train", "sample"],
                        "The train step, or sampling (bench's --prompt_len and --new_tokens).")
_STEPS = flags.DEFINE_integer("steps", 2, "Traced train steps (after one untraced).")
_TOP = flags.DEFINE_integer("top", 15, "Ops listed one by one.")

_OP_LINE = re.compile(r'\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]*)"')
_NUMBERED = re.compile(r"[.]\d+$")  # dot.182 -> dot
_WRAPPER = re.compile(r"(transpose\()?jvp\(.*|while|body|h_\d+|GPT\.(hidden_states|_stack|decode|_final)")


def op_names(dump_dir: str) -> dict:
    """(module, op) -> the op's metadata op_name, from the dumped optimised HLO; a module
    compiled more than once keeps its last compilation's names."""
    names = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
        module = os.path.basename(path).split(".")[1]
        for line in open(path):
            if match := _OP_LINE.match(line):
                names[(module, match.group(1))] = match.group(2)
    return names


def part(op_name: str) -> str:
    """'jit(train_step)/transpose(jvp(GPT))/GPT.hidden_states/GPT._stack/h_3/mlp/c_fc/dot_general'
    -> 'backward mlp/c_fc/dot_general': the layer index and the wrappers dropped."""
    direction = "backward " if "transpose(" in op_name else ""
    path = [p for p in op_name.split("/")[1:] if not _WRAPPER.fullmatch(p)]
    where = "/".join(path[-4:]) or op_name
    return direction + (where if len(path) > 1 else f"outside the model: {where}")


def trace_ops(run, units: int) -> tuple[collections.Counter, collections.Counter, float]:
    """Runs `run` under the profiler: (seconds per unit by (module, op), calls per unit, wall
    seconds per unit)."""
    trace_dir = os.path.join(_DUMP, "trace")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run()
    wall = (time.perf_counter() - start) / units
    path, = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    events = json.load(gzip.open(path))
    seconds, calls = collections.Counter(), collections.Counter()
    for event in events["traceEvents"] if isinstance(events, dict) else events:
        args = event.get("args") or {}
        if event.get("ph") == "X" and "hlo_op" in args:
            key = (args.get("hlo_module", ""), args["hlo_op"])
            seconds[key] += event["dur"] / 1e6 / units
            calls[key] += 1 / units
    return seconds, calls, wall


def main(_):
    try:
        report(*profile())
    finally:
        shutil.rmtree(_DUMP, ignore_errors=True)


def profile():
    """(seconds and calls per unit by (module, op), wall seconds per unit, the unit, op names)."""
    config, model = bench.as_benchmarked(bench._CONFIG.value)  # pylint: disable=protected-access
    if _OF.value == "train":
        tx, schedule = make_optimizer(config.optim, config.train.steps, model.ops)
        batch = jax.device_put(bench.random_batch(config, np.random.default_rng(0)))
        train = make_steps(model, schedule, "jit",
                           compiler_options=common.kernels(config)[1]).train
        state = create_state(model, tx, config.train.seed, config.data.seq_len)
        state, metrics = train(state, batch)
        jax.block_until_ready(metrics)

        def run():
            nonlocal state
            for _ in range(_STEPS.value):
                state, metrics = train(state, batch)
                jax.block_until_ready(metrics)
        units, unit = _STEPS.value, "step"
    else:
        params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), *model.example_inputs(8))["params"])()
        prompt = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, bench._PROMPT_LEN.value))
        new_tokens = bench._NEW_TOKENS.value  # pylint: disable=protected-access
        run = lambda: generate(model, params, prompt.tolist(), max_new_tokens=new_tokens,  # noqa: E731
                               rng=jax.random.PRNGKey(0), temperature=0.0)
        run()
        units, unit = new_tokens, "new token"
    return (*trace_ops(run, units), unit, op_names(_DUMP))


def report(seconds, calls, wall: float, unit: str, names: dict) -> None:
    by_part = collections.Counter()
    for key, s in seconds.items():
        by_part[part(names[key]) if key in names else "no metadata: " + _NUMBERED.sub("", key[1])] += s
    print(f"wall {wall * 1e3:.1f} ms per {unit} under the profiler, which slows it; ops "
          f"{sum(seconds.values()) * 1e3:.1f} ms "
          "(concurrent ops each counted in full)")
    print(f"{'ms/' + unit:>14}  part")
    for name, s in by_part.most_common():
        print(f"{s * 1e3:14.2f}  {name}")
    print(f"\n{'ms/' + unit:>14}  {'calls':>6}  op  (module: HLO op_name)")
    for key, s in seconds.most_common(_TOP.value):
        print(f"{s * 1e3:14.2f}  {calls[key]:6.1f}  {key[1]}  ({key[0]}: {names.get(key, '?')})")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
