"""The fused CPU cross-entropy kernel against optax's, which is the definition."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt import cpu, ops
from gpt.cpu import cross_entropy, matmul
from tests.helpers import batches, max_relative_error, model_and_state, tiny_config


KERNELS = cpu.ops()


def softmax_cross_entropy(logits, labels, fused=True):
    return (KERNELS if fused else ops.REFERENCE).nll(logits, labels)


def tied_head_cross_entropy(h, table, labels, fused=True, mkl=None):
    if not fused:
        return ops.tied_head_nll(h, table, labels)
    mkl = matmul.loaded() if mkl is None else mkl
    return cross_entropy.tied_head_nll(ops.tied_head_nll, mkl)(h, table, labels)


def _logits_and_labels(shape, vocab, scale, seed=0):
    k_logits, k_labels = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(k_logits, (*shape, vocab)) * scale,
            jax.random.randint(k_labels, shape, 0, vocab))


def _float64_truth(logits, labels, weights):
    x = np.asarray(logits, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, np.asarray(labels)[..., None], -1)[..., 0]
    grad = np.exp(log_p) - np.eye(x.shape[-1])[np.asarray(labels)]
    return nll, grad * np.asarray(weights, np.float64)[..., None]


# Vocabularies that are and are not multiples of a vector; logits wide enough that exp of
# (logit - max) underflows; rows that do not fill the kernel's blocks of 8.
@pytest.mark.parametrize("shape,vocab,scale", [((3, 7), 1001, 30.0), ((2, 3), 50257, 4.0),
                                               ((13,), 5, 1.0), ((4, 2, 3), 64, 100.0)])
def test_loss_and_gradient_as_accurate_as_optax(shape, vocab, scale):
    logits, labels = _logits_and_labels(shape, vocab, scale)
    weights = jax.random.uniform(jax.random.key(1), shape)  # a gradient that differs per row
    nll, grad = _float64_truth(logits, labels, weights)

    def weighted(loss):
        return jax.jit(jax.value_and_grad(lambda x: (loss(x, labels) * weights).sum()))

    ours = softmax_cross_entropy(logits, labels, fused=True)
    _, d_ours = weighted(functools.partial(softmax_cross_entropy, fused=True))(logits)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    _, d_ref = weighted(optax.softmax_cross_entropy_with_integer_labels)(logits)
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=2e-7 * scale)
    np.testing.assert_allclose(d_ours, d_ref, rtol=1e-5, atol=1e-7)
    # No further from float64 than optax's (float32 rounding of the logits aside).
    assert np.abs(ours - nll).max() <= 2 * np.abs(ref - nll).max() + 1e-7 * scale
    assert np.abs(d_ours - grad).max() <= 2 * np.abs(d_ref - grad).max() + 1e-8


def test_vmap_and_non_float32_inputs():
    logits, labels = _logits_and_labels((4, 6), 300, 3.0)
    batched = jax.vmap(lambda x, y: softmax_cross_entropy(x, y, fused=True))(logits, labels)
    np.testing.assert_allclose(batched, optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                               rtol=2e-6)
    half = softmax_cross_entropy(logits.astype(jnp.bfloat16), labels.astype(jnp.int16), fused=True)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.bfloat16).astype(jnp.float32), labels), rtol=2e-6)


def test_a_label_outside_the_vocabulary_is_nan_not_a_stray_read():
    logits, labels = _logits_and_labels((4,), 50, 1.0)
    labels = labels.at[1].set(50).at[2].set(-1)
    loss, grad = jax.value_and_grad(lambda x: softmax_cross_entropy(x, labels, fused=True)[0])(logits)
    values = softmax_cross_entropy(logits, labels, fused=True)
    assert np.isnan(values[1]) and np.isnan(values[2]) and np.isfinite(np.asarray(values)[[0, 3]]).all()
    assert np.isfinite(loss) and np.isfinite(grad).all()


def test_the_kernel_runs_where_a_step_is_lowered_for_cpu_only():
    logits, labels = _logits_and_labels((2, 3), 40, 1.0)
    traced = jax.jit(jax.grad(lambda x: softmax_cross_entropy(x, labels).mean())).trace(logits)
    hlo = traced.lower().as_text()
    assert "gpt_cross_entropy_fwd" in hlo and "gpt_cross_entropy_bwd" in hlo
    for platform in ("cuda", "tpu"):
        assert "gpt_cross_entropy" not in traced.lower(lowering_platforms=(platform,)).as_text()


# 32 rows fill the kernel's blocks of 16 (streamed transposes on AVX-512); 37 leave a tail.
# With MKL the table's gradient reads the logits' gradient transposed; without, the kernel
# writes the transpose.
@pytest.mark.parametrize("rows,vocab", [(32, 1001), (37, 333)])
@pytest.mark.parametrize("blas", ["1", "0"])
def test_tied_head_gradients_match_autodiff_of_the_unfused_head(rows, vocab, blas):
    mkl = blas == "1" and matmul.loaded()
    k_h, k_table, k_labels, k_weights = jax.random.split(jax.random.key(2), 4)
    h = jax.random.normal(k_h, (rows, 8))
    table = jax.random.normal(k_table, (vocab, 8))
    labels = jax.random.randint(k_labels, (rows,), 0, vocab)
    weights = jax.random.uniform(k_weights, (rows,))

    def grads(fused):
        def loss(h, table):
            return (tied_head_cross_entropy(h, table, labels, fused=fused, mkl=mkl) * weights).sum()
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, table)

    (ours, (dh, dtable)), (ref, (dh_ref, dtable_ref)) = grads(True), grads(False)
    np.testing.assert_allclose(ours, ref, rtol=2e-6)
    assert max_relative_error(dh, dh_ref) < 1e-6 and max_relative_error(dtable, dtable_ref) < 1e-6
    hlo = jax.jit(jax.grad(lambda h: tied_head_cross_entropy(
        h, table, labels, fused=True, mkl=mkl).sum())).lower(h).as_text()
    assert ("gpt_cross_entropy_bwd_t" in hlo) != mkl and ("gpt_matmul" in hlo) == mkl


@pytest.mark.parametrize("tied", [True, False])
def test_next_token_nll_is_the_loss_of_the_models_logits(tied):
    config = tiny_config(**{"model.tie_embeddings": tied})
    model, _, state = model_and_state(config, KERNELS)
    batch = batches(config, 1)[0]

    def loss(params, fused_path):
        variables = {"params": params}
        if fused_path:
            return model.apply(variables, batch["inputs"], batch["targets"], method="next_token_nll").mean()
        logits = model.apply(variables, batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    (ours, grads), (ref, grads_ref) = (jax.value_and_grad(loss)(state.params, path) for path in (True, False))
    np.testing.assert_allclose(ours, ref, rtol=2e-6)
    assert max_relative_error(grads, grads_ref) < 1e-5


def test_tied_head_under_vmap():
    k_h, k_table, k_labels = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(k_h, (3, 16, 8))
    table = jax.random.normal(k_table, (100, 8))
    labels = jax.random.randint(k_labels, (3, 16), 0, 100)

    def grad_table(fused):
        def loss(table):
            return jax.vmap(lambda h, y: tied_head_cross_entropy(h, table, y, fused=fused).sum())(h, labels).sum()
        return jax.grad(loss)(table)

    assert max_relative_error(grad_table(True), grad_table(False)) < 1e-6
