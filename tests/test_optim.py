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
    for frac in (0.1, 0.25, 0.8):  # in between, the decay's own formula
        step = warmup + frac * (total - warmup)
        shape = {"cosine": 0.5 * (1 + np.cos(np.pi * frac)), "linear": 1 - frac, "constant": 1.0}
        expected = end + (lr - end) * shape[schedule] if schedule != "constant" else lr
        np.testing.assert_allclose(float(s(step)), expected, rtol=1e-5)
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
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decay_mask_follows_names_in_every_layout(scan_layers):
    """Scanned blocks stack each parameter along a layer axis, so biases and gains are
    matrices there: still not decayed. Neither is a fine-tuning classifier's bias."""
    from gpt.config import GPTConfig
    from gpt.finetune.model import GPTClassifier
    cfg = GPTConfig(vocab_size=11, max_len=8, n_layer=2, d_model=8, n_head=2, d_ff=16,
                    scan_layers=scan_layers)
    model = GPTClassifier(cfg, num_outputs=3)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.example_inputs(8))["params"]
    flat = {"/".join(k.key for k in path): (leaf, decayed) for (path, leaf), decayed in zip(
        jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree_util.tree_leaves(decay_mask(shapes)))}
    assert all(decayed == (name.rsplit("/", 1)[-1] in ("kernel", "embedding"))
               for name, (_, decayed) in flat.items())
    assert flat["clf/kernel"][1] and not flat["clf/bias"][1] and flat["wpe/embedding"][1]
    if scan_layers:
        assert flat["h/block/ln_1/scale"][0].ndim == 2 and not flat["h/block/ln_1/scale"][1]


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
