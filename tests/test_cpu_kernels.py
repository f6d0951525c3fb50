"""The C++ kernels' build: done here, cached, and optional."""
import os
import subprocess
import sys

import jax
import numpy as np

from gpt import cpu_kernels
from gpt.config import GPTConfig
from gpt.model import GPT
from tests.helpers import ROOT


def test_the_kernels_build_here():
    # Not a skip: CI and the README's setup have a C++ compiler, so the fast paths are what
    # the rest of the suite exercises.
    assert cpu_kernels.available()
    assert cpu_kernels.build() == cpu_kernels.build()  # cached: built once per source


def test_without_a_compiler_the_model_runs_on_xlas_ops(tmp_path):
    code = ("import jax, numpy as np, optax\n"
            "from gpt import cpu_kernels\n"
            "from gpt.cross_entropy import softmax_cross_entropy\n"
            "from gpt.config import GPTConfig\nfrom gpt.model import GPT\n"
            "from gpt.optim import make_optimizer\n"
            "from configs.gpt2 import get_config\n"
            "x = jax.random.normal(jax.random.key(0), (3, 9)); y = np.array([0, 4, 8])\n"
            "assert not cpu_kernels.available()\n"
            "np.testing.assert_allclose(softmax_cross_entropy(x, y),\n"
            "    optax.softmax_cross_entropy_with_integer_labels(x, y))\n"
            "model = GPT(GPTConfig(vocab_size=50, max_len=8, n_layer=1, d_model=32, n_head=2, d_ff=64))\n"
            "tokens = np.zeros((1, 8), np.int32)\n"
            "params = model.init(jax.random.key(0), tokens)['params']\n"
            "hlo = jax.jit(lambda p: model.apply({'params': p}, tokens, tokens,\n"
            "    method='next_token_nll')).lower(params).as_text()\n"
            "assert 'gpt_' not in hlo, hlo\n"
            "tx, _ = make_optimizer(get_config('tiny').optim, 10)\n"
            "assert 'gpt_' not in jax.jit(tx.apply).lower(params, tx.init(params), params).as_text()\n"
            "try:\n    softmax_cross_entropy(x, y, fused=True)\nexcept RuntimeError as e:\n"
            "    print('refused:', e)\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), XDG_CACHE_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "refused: the fused cross-entropy kernel could not be built" in result.stdout
    assert "fused CPU kernels unavailable, using XLA's ops" in result.stderr
    assert not list(tmp_path.glob("gpt-jax/*.so*"))  # no half-built library left behind


def test_what_is_traced_without_the_kernels_uses_xlas_ops():
    # What the mesh steps trace with (gpt/train_step.py): XLA's partitioner would gather a
    # custom call's operands whole onto every device.
    model = GPT(GPTConfig(vocab_size=50, max_len=8, n_layer=1, d_model=32, n_head=2, d_ff=64))
    tokens = np.zeros((2, 8), np.int32)
    params = model.init(jax.random.key(0), tokens)["params"]

    def hlo(fn):
        return jax.jit(fn).lower(params).as_text()

    def nll(p):
        return model.apply({"params": p}, tokens, tokens, method="next_token_nll").mean()

    kernels = hlo(nll)
    assert "gpt_attention_fwd" in kernels and "gpt_cross_entropy" in kernels
    assert "gpt_" not in hlo(cpu_kernels.traced_without(nll))
    assert "gpt_attention_fwd" in hlo(nll)  # only within
