"""The C++ kernels' build: done here, cached, and optional."""
import os
import subprocess
import sys

import jax
import numpy as np

from gpt import cpu
from gpt.cpu import build
from gpt.config import GPTConfig
from gpt.model import GPT
from tests.helpers import ROOT


def test_the_kernels_build_here():
    # Not a skip: CI and the README's setup have a C++ compiler, so the kernels' tests run.
    assert build.available()
    assert build.build() == build.build()  # cached: built once per source


def test_without_a_compiler_the_bundle_is_xlas_ops(tmp_path):
    code = ("import jax, numpy as np\n"
            "from gpt import cpu, ops\n"
            "from gpt.cpu import build\n"
            "assert not build.available()\n"
            "assert cpu.ops() is ops.REFERENCE\n"
            "try:\n    build.require('attention')\nexcept RuntimeError as e:\n"
            "    print('refused:', e)\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), XDG_CACHE_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "refused: the fused attention kernel could not be built" in result.stdout
    assert "fused CPU kernels unavailable, using XLA's ops" in result.stderr
    assert not list(tmp_path.glob("gpt-jax/*.so*"))  # no half-built library left behind


def test_a_step_lowered_for_an_accelerator_has_no_kernel():
    model = GPT(GPTConfig(vocab_size=50, max_len=8, n_layer=1, d_model=32, n_head=2, d_ff=64),
                cpu.ops())
    tokens = np.zeros((2, 8), np.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    traced = jax.jit(jax.grad(lambda p: model.apply(
        {"params": p}, tokens, tokens, method="next_token_nll").mean())).trace(params)
    kernels = traced.lower().as_text()
    assert "gpt_attention_fwd" in kernels and "gpt_cross_entropy" in kernels
    for platform in ("cuda", "tpu"):
        assert "gpt_" not in traced.lower(lowering_platforms=(platform,)).as_text()


def test_train_kernels_selects_which_kernels_run():
    from configs import gpt2
    from experiments import common
    from gpt.config import ConfigError, validate
    from gpt.ops import REFERENCE
    config = gpt2.get_config("tiny")
    config.train.kernels = "attention,adamw"
    validate(config)
    ops, _ = common.kernels(config)
    model = GPT(GPTConfig(vocab_size=50, max_len=8, n_layer=1, d_model=32, n_head=2, d_ff=64), ops)
    tokens = np.zeros((2, 8), np.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    hlo = jax.jit(jax.grad(lambda p: model.apply(
        {"params": p}, tokens, tokens, method="next_token_nll").mean())).lower(params).as_text()
    assert "gpt_attention_fwd" in hlo and "gpt_matmul" not in hlo and "gpt_cross_entropy" not in hlo
    assert ops.adamw is not None
    config.train.kernels = "-matmul"
    assert common.kernels(config)[0].dot_general is jax.lax.dot_general
    assert common.kernels(config)[0].nll is not REFERENCE.nll
    config.train.kernels = "attention,flash"
    try:
        validate(config)
    except ConfigError as e:
        assert "train.kernels" in str(e) and "cross_entropy" in str(e)
    else:
        raise AssertionError("an unknown kernel was accepted")
