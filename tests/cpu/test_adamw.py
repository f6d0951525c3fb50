"""The fused AdamW update (gpt/cpu/adamw.cc) against optax's, which is the definition."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import gpt1
from gpt import cpu
from gpt.ops import REFERENCE
from gpt.optim import make_optimizer


def _optim(**kw):
    o = gpt1.get_config("").optim
    for k, v in kw.items():
        o[k] = v
    return o


def _ulps(a, b):
    """The largest |a - b| in units in the last place of b's largest magnitude: an update
    p + u can cancel to near 0, where one rounding of p or u is many of the result's ulps."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.max(np.abs(a - b), initial=0.0) / np.spacing(np.max(np.abs(b), initial=1.0))


def _steps(tx):
    @jax.jit
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
    return step


@pytest.mark.parametrize("clip", [0.0, 1.0, 1e6])  # off; on and clipping; on, not clipping
def test_fused_update_is_optaxs(clip):
    """Four steps through warmup on a matrix (decayed), a bias (not) and a vector longer than
    one of the kernel's blocks (its parallel loop): parameters, both moments and the counts
    as optax leaves them, up to a few roundings (the compiler contracts a*b + c)."""
    o = _optim(lr=1e-2, warmup_steps=2, schedule="cosine", end_lr=1e-3, weight_decay=0.1,
               grad_clip=clip, b2=0.95)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(30, 7)), "bias": rng.normal(size=7),
              "v": {"embedding": rng.normal(size=70001)}}
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1 * (i + 1),
                                                          jnp.float32), params) for i in range(4)]
    out = {}
    for name, ops in (("fused", cpu.ops()), ("optax", REFERENCE)):
        tx, _ = make_optimizer(o, 10, ops)
        step = _steps(tx)
        assert step.lower(grads[0], tx.init(params), params).as_text().count("gpt_adamw") == \
            (3 if name == "fused" else 0)
        p, state = params, tx.init(params)
        for g in grads:
            p, state = step(g, state, p)
        out[name] = (p, state)
    fused, reference = out["fused"], out["optax"]
    assert jax.tree_util.tree_structure(fused) == jax.tree_util.tree_structure(reference)
    for a, b in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(reference)):
        assert a.dtype == b.dtype and _ulps(a, b) <= 4, (_ulps(a, b), a.shape)
    assert optax.tree_utils.tree_get(fused[1], "ScaleByAdamState").count == 4
    if clip == 1.0:  # the gradients' norms were above it: the moments saw clipped gradients
        nu = optax.tree_utils.tree_get(fused[1], "nu")["v"]["embedding"]
        assert float(jnp.max(nu)) < 1.0


def test_fused_update_is_optaxs_off_cpu_and_for_other_dtypes():
    tx, _ = make_optimizer(_optim(grad_clip=1.0), 10, cpu.ops())
    params = {"kernel": jnp.ones((4, 4))}
    traced = _steps(tx).trace(params, tx.init(params), params)
    assert "gpt_adamw" in traced.lower().as_text()
    for platform in ("cuda", "tpu"):
        assert "gpt_adamw" not in traced.lower(lowering_platforms=(platform,)).as_text()
    half = {"kernel": jnp.ones((4, 4), jnp.bfloat16)}
    assert "gpt_adamw" not in _steps(tx).lower(half, tx.init(half), half).as_text()


def test_the_fused_update_composes_with_optax_chain():
    tx, _ = make_optimizer(_optim(grad_clip=1.0), 10, cpu.ops())
    chained = optax.chain(optax.scale(1.0), tx)
    params = {"kernel": jnp.ones((4, 4))}
    updates, _ = chained.update(params, chained.init(params), params)
    assert updates["kernel"].shape == (4, 4)
