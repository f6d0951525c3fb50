"""gpt.ops, the reference compute: the accelerators' attention kernels against the einsums, and
the project without its optional CPU package."""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gpt import ops
from tests.helpers import ROOT, max_relative_error


def test_splash_attention_matches_the_einsums_in_interpret_mode():
    """Pallas' TPU kernel, run by Pallas' interpreter on this CPU: outputs and gradients."""
    qkv = jax.random.normal(jax.random.key(0), (2, 256, 3 * 2 * 64))
    dout = jax.random.normal(jax.random.key(1), (2, 256, 2 * 64))

    def loss(attend):
        return jax.value_and_grad(lambda x: (attend(x) * dout).sum())(qkv)

    splash = loss(lambda x: ops.splash_causal_attention(x, n_head=2, interpret=True))
    xla = loss(lambda x: ops.xla_causal_attention(x, n_head=2))
    np.testing.assert_allclose(splash[0], xla[0], rtol=1e-4)
    assert max_relative_error(splash[1], xla[1]) < 1e-4


def test_auto_attention_per_platform():
    qkv = jax.ShapeDtypeStruct((1, 128, 3 * 128), jnp.float32)
    traced = jax.jit(lambda x: ops.causal_attention(x, n_head=2)).trace(qkv)
    assert "tpu_custom_call" in traced.lower(lowering_platforms=("tpu",)).as_text()
    for platform in ("cpu", "cuda"):  # cuda: xla on a host without cuDNN, as here
        assert "custom_call" not in traced.lower(lowering_platforms=(platform,)).as_text()
    short = jax.ShapeDtypeStruct((1, 96, 3 * 128), jnp.float32)  # not a multiple of the block
    text = jax.jit(lambda x: ops.causal_attention(x, n_head=2)).trace(short).lower(
        lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" not in text


def test_the_project_runs_without_its_cpu_package(tmp_path):
    """Deleting gpt/cpu/ leaves a working project: training runs on XLA's ops."""
    clone = tmp_path / "clone"
    def ignore(directory, names):
        if os.path.samefile(directory, ROOT):
            return {".git", ".venv", "runs", "data", "docs", "tests"} & set(names)
        return {"cpu"} if os.path.basename(directory) == "gpt" else set()

    shutil.copytree(ROOT, clone, ignore=ignore)
    assert not (clone / "gpt" / "cpu").exists()
    env = dict(os.environ, PYTHONPATH=str(clone))
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config=configs/gpt2.py:tiny",
         f"--workdir={tmp_path / 'run'}", "--config.train.steps=2", "--config.train.log_every=1",
         "--config.train.eval_every=2", "--config.train.eval_steps=1", "--config.data.batch_size=2",
         f"--config.data.data_dir={tmp_path / 'data'}"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"kernels": "auto"' in (tmp_path / "run" / "config.json").read_text()
