import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import gpt1
from gpt.optim import decay_mask, lr_schedule, make_optimizer


def _optim(**kw):
    o = gpt1.get_config("").optim
    for k, v in kw.items():
        o[k] = v
    return o


@pytest.mark.parametrize("schedule, middle", [("cosine", 0.5), ("linear", 0.5), ("constant", 1.0)])
def test_schedule_values(schedule, middle):
    lr, end, warmup, total = 2.5e-4, 2.5e-5, 2000, 12000
    o = _optim(lr=lr, end_lr=end if schedule != "constant" else 0.0, warmup_steps=warmup, schedule=schedule)
    s = lr_schedule(o, total)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(warmup // 2)), lr / 2, rtol=1e-6)
    np.testing.assert_allclose(float(s(warmup)), lr, rtol=1e-6)
    mid_value = end + (lr - end) * middle if schedule != "constant" else lr
    np.testing.assert_allclose(float(s(warmup + (total - warmup) // 2)), mid_value, rtol=1e-5)
    np.testing.assert_allclose(float(s(total)), end if schedule != "constant" else lr, rtol=1e-5)


def test_gpt1_schedule_is_cosine_to_zero():
    s = lr_schedule(gpt1.get_config("").optim, 10000)
    assert float(s(10000)) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(float(s(2000)), 2.5e-4, rtol=1e-6)


def test_decay_mask_excludes_biases_and_gains():
    params = {"wte": {"embedding": jnp.ones((5, 4))},
              "h_0": {"ln_1": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
                      "mlp": {"c_fc": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)}}}}
    mask = decay_mask(params)
    assert mask["wte"]["embedding"] and mask["h_0"]["mlp"]["c_fc"]["kernel"]
    assert not any([mask["h_0"]["ln_1"]["scale"], mask["h_0"]["ln_1"]["bias"],
                    mask["h_0"]["mlp"]["c_fc"]["bias"]])


def test_weight_decay_applies_only_where_masked():
    """With zero gradients Adam's update is 0, so any change is weight decay: lr * wd * w."""
    o = _optim(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, grad_clip=0.0)
    tx, _ = make_optimizer(o, 10)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], 0.0)


def test_clipping_scales_gradients_to_the_global_norm():
    """Adam's second moment after one step records the gradient that reached it."""
    o = _optim(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    params = {"w": jnp.zeros(4), "v": jnp.zeros(2)}
    grads = {"w": jnp.full(4, 3.0), "v": jnp.full(2, 4.0)}  # global norm sqrt(36 + 32)
    for clip, scale in ((1.0, 1.0 / np.sqrt(68.0)), (0.0, 1.0)):
        tx, _ = make_optimizer(ml_collections.ConfigDict(dict(o, grad_clip=clip)), 10)
        _, state = tx.update(grads, tx.init(params), params)
        nu = optax.tree_utils.tree_get(state, "nu")
        np.testing.assert_allclose(nu["w"], (1 - o.b2) * (3.0 * scale) ** 2, rtol=1e-5)


def _ulps(a, b):
    """The largest |a - b| in units in the last place of b's largest magnitude: an update
    p + u can cancel to near 0, where one rounding of p or u is many of the result's ulps."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.max(np.abs(a - b), initial=0.0) / np.spacing(np.max(np.abs(b), initial=1.0))


@pytest.mark.parametrize("clip", [0.0, 1.0, 1e6])  # off; on and clipping; on, not clipping
def test_fused_update_is_optaxs(clip):
    """Four steps through warmup on a matrix (decayed), a bias (not) and a vector longer than
    one of the kernel's blocks (its parallel loop): parameters, both moments and the counts
    as optax leaves them, up to a few roundings (the compiler contracts a*b + c)."""
    o = _optim(lr=1e-2, warmup_steps=2, schedule="cosine", end_lr=1e-3, weight_decay=0.1,
               grad_clip=clip, b2=0.95)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(30, 7)), "b": rng.normal(size=7), "v": rng.normal(size=70001)}
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1 * (i + 1),
                                                          jnp.float32), params) for i in range(4)]
    out = {}
    for fused in (True, False):
        tx, _ = make_optimizer(o, 10, fused=fused)
        apply = jax.jit(tx.apply)
        assert apply.lower(grads[0], tx.init(params), params).as_text().count("gpt_adamw") == \
            (3 if fused else 0)
        p, state = params, tx.init(params)
        for g in grads:
            p, state = apply(g, state, p)
        out[fused] = (p, state)
    fused, reference = out[True], out[False]
    assert jax.tree_util.tree_structure(fused) == jax.tree_util.tree_structure(reference)
    for a, b in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(reference)):
        assert a.dtype == b.dtype and _ulps(a, b) <= 4, (_ulps(a, b), a.shape)
    assert optax.tree_utils.tree_get(fused[1], "ScaleByAdamState").count == 4
    if clip == 1.0:  # the gradients' norms were above it: the moments saw clipped gradients
        nu = optax.tree_utils.tree_get(fused[1], "nu")["v"]
        assert float(jnp.max(nu)) < 1.0


def test_fused_update_leaves_other_dtypes_and_off_traces_to_optax():
    from gpt import cpu_kernels
    tx, _ = make_optimizer(_optim(grad_clip=1.0), 10)
    params = {"w": jnp.ones((4, 4))}

    def hlo(p, apply=tx.apply):
        return jax.jit(apply).lower(p, tx.init(p), p).as_text()

    assert "gpt_adamw" in hlo(params)
    assert "gpt_adamw" not in hlo({"w": jnp.ones((4, 4), jnp.bfloat16)})
    assert "gpt_adamw" not in hlo(params, cpu_kernels.traced_without(tx.apply))
