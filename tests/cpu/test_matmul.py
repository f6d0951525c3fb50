"""The MKL matmul kernel against float64 products, and the model with it against XLA's dots."""
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt import cpu
from gpt.cpu import matmul
from gpt.ops import REFERENCE
from gpt.config import GPTConfig
from gpt.model import GPT
from tests.helpers import ROOT, max_relative_error


# Where requirements.txt installs MKL (CI's platform). Elsewhere the kernel cannot run, and only
# the tests of the fallback below apply.
MKL_PLATFORM = sys.platform.startswith("linux") and platform.machine() == "x86_64"
needs_mkl = pytest.mark.skipif(not MKL_PLATFORM, reason="MKL is installed on x86-64 Linux only")


def test_mkl_is_loaded_where_requirements_install_it():
    assert matmul.loaded() == MKL_PLATFORM


def _op(x, transposed):
    return np.swapaxes(x, -1, -2) if transposed else x


# Products split into blocks of rows (m >= n) and of columns (m < n), with partial last blocks;
# shapes that are one block; a batch.
@needs_mkl
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("batch,m,k,n", [((), 701, 33, 130), ((), 5, 70, 1001), ((), 1, 9, 1),
                                         ((2, 3), 150, 20, 40)])
def test_product_and_gradients_match_float64(transpose_a, transpose_b, batch, m, k, n):
    k_a, k_b, k_g = jax.random.split(jax.random.key(m * n + k), 3)
    a = jax.random.normal(k_a, (*batch, *((k, m) if transpose_a else (m, k))))
    b = jax.random.normal(k_b, (*batch, *((n, k) if transpose_b else (k, n))))
    g = jax.random.normal(k_g, (*batch, m, n))
    a64, b64, g64 = (np.asarray(x, np.float64) for x in (a, b, g))
    c_truth = _op(a64, transpose_a) @ _op(b64, transpose_b)
    dopa, dopb = g64 @ np.swapaxes(_op(b64, transpose_b), -1, -2), np.swapaxes(_op(a64, transpose_a), -1, -2) @ g64
    truth = (c_truth, _op(dopa, transpose_a), _op(dopb, transpose_b))
    errors = {}
    for name, fn in [("kernel", lambda a, b: matmul.matmul(a, b, transpose_a, transpose_b)),
                     ("xla", lambda a, b: _op(a, transpose_a) @ _op(b, transpose_b))]:
        c, vjp = jax.vjp(jax.jit(fn), a, b)
        errors[name] = [max_relative_error(x, y) for x, y in zip((c, *vjp(g)), truth)]
    assert all(e < 3 * x + 1e-7 for e, x in zip(errors["kernel"], errors["xla"])), errors


@needs_mkl
def test_under_vmap():
    x = jax.random.normal(jax.random.key(0), (4, 50, 20))
    w = jax.random.normal(jax.random.key(1), (20, 30))
    got = jax.jit(jax.vmap(lambda x: matmul.matmul(x, w)))(x)
    assert max_relative_error(got, np.asarray(x, np.float64) @ np.asarray(w, np.float64)) < 1e-6


@needs_mkl
@pytest.mark.parametrize("m,k,n", [(0, 4, 6), (4, 0, 6), (4, 6, 0)])
def test_empty_dimensions(m, k, n):
    c, vjp = jax.vjp(matmul.matmul, jnp.ones((m, k)), jnp.ones((k, n)))
    da, db = vjp(jnp.ones((m, n)))
    assert c.shape == (m, n) and not np.asarray(c).any()
    assert da.shape == (m, k) and db.shape == (k, n)


def _model(**overrides):
    fields = dict(vocab_size=97, max_len=16, n_layer=2, d_model=64, n_head=4, d_ff=128,
                  embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    ops = overrides.pop("ops", None) or cpu.ops()
    return GPT(GPTConfig(**{**fields, **overrides}), ops)


@needs_mkl
@pytest.mark.parametrize("tied", [True, False])
def test_the_model_matches_its_xla_dots(tied):
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 97)
    params = _model(tie_embeddings=tied).init(jax.random.key(1), tokens)["params"]
    results = {}
    for blas, ops in (("1", cpu.ops()), ("0", REFERENCE)):
        model = _model(tie_embeddings=tied, ops=ops)
        fn = jax.jit(jax.value_and_grad(lambda p: model.apply(
            {"params": p}, tokens, tokens, method="next_token_nll").mean()))
        # Every dense layer and the head: 4 per block and 1, each forward and twice backward.
        assert fn.lower(params).as_text().count("gpt_matmul") == (3 * (4 * 2 + 1) if blas == "1" else 0)
        results[blas] = fn(params)
    np.testing.assert_allclose(results["1"][0], results["0"][0], rtol=1e-6)
    assert max_relative_error(results["1"][1], results["0"][1]) < 1e-5


def test_xlas_dots_where_the_kernel_does_not_apply():
    model = _model(dtype="bfloat16")
    tokens = jnp.zeros((1, 16), jnp.int32)
    params = model.init(jax.random.key(1), tokens)["params"]
    assert "gpt_matmul" not in jax.jit(lambda p: model.apply({"params": p}, tokens)).lower(params).as_text()
    x, w = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6))  # a batched contraction: not a dense layer
    dims = (((2,), (1,)), ((0,), (0,)))
    assert "gpt_matmul" not in jax.jit(lambda x, w: matmul.dot_general(x, w, dims)).lower(x, w).as_text()
    np.testing.assert_allclose(matmul.dot_general(x, w, dims), x @ w)


def test_without_mkl_the_model_uses_xlas_dots():
    code = ("import jax, numpy as np\n"
            "from gpt import cpu\nfrom gpt.cpu import matmul\n"
            "from gpt.config import GPTConfig\nfrom gpt.model import GPT\n"
            "matmul._mkl_library = lambda: None\n"
            "assert not matmul.loaded()\n"
            "model = GPT(GPTConfig(vocab_size=50, max_len=8, n_layer=1, d_model=32, n_head=2, d_ff=64), cpu.ops())\n"
            "tokens = np.zeros((1, 8), np.int32)\n"
            "params = model.init(jax.random.key(0), tokens)['params']\n"
            "hlo = jax.jit(lambda p: model.apply({'params': p}, tokens, tokens,\n"
            "    method='next_token_nll')).lower(params).as_text()\n"
            "assert 'gpt_matmul' not in hlo and 'gpt_attention_fwd' in hlo, hlo\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
