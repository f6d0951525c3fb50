"""Evaluation in micro-batches: it fits wherever training fits and gives the whole batch's result."""
import jax
import numpy as np
import pytest

from configs import gpt2
from gpt.config import eval_micro_batch, model_config, validate
from gpt.finetune.model import GPTClassifier, make_evaluate
from gpt.optim import make_optimizer
from gpt.parallel import make_steps
from gpt.train_step import create_state
from tests.helpers import batches, compiled_memory, model_and_state, tiny_config


def test_gpt2_small_eval_step_needs_no_more_memory_than_its_train_step():
    """The published config on one device, compiled from abstract shapes (nothing allocated):
    XLA's buffer assignment for eval must not exceed the train step's temporaries."""
    config = gpt2.get_config("small")
    assert eval_micro_batch(config, num_devices=1) == 8  # 512 rows in 64 micro-batches
    train, evaluate = compiled_memory(config)
    assert evaluate.temp_size_in_bytes <= train.temp_size_in_bytes, (
        f"eval temporaries {evaluate.temp_size_in_bytes / 2**30:.1f} GiB > "
        f"train {train.temp_size_in_bytes / 2**30:.1f} GiB")


def _token_mean_nll(model, params, batch) -> float:
    """The reference: float64 log-softmax of the model's logits, averaged over every token."""
    logits = np.asarray(model.apply({"params": params}, batch["inputs"]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, batch["targets"][..., None], -1).mean())


def test_micro_batched_lm_eval_is_the_mean_over_all_tokens():
    config = tiny_config()
    model, schedule, state = model_and_state(config)
    batch = batches(config, 1)[0]
    expected = _token_mean_nll(model, state.params, batch)
    for micro_batches in (1, 4):
        steps = make_steps(model, schedule, "jit", eval_micro_batches=micro_batches)
        np.testing.assert_allclose(float(steps.eval(state, batch)["loss"]), expected, rtol=1e-5)


def test_micro_batched_classifier_eval_keeps_every_example_in_order():
    """Per-example outputs come back in the batch's order; sums keep their ratio."""
    config = tiny_config()
    model = GPTClassifier(model_config(config), num_outputs=3, num_sequences=1, multiple_choice=False)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    state = create_state(model, tx, 0, config.data.seq_len)
    rng = np.random.default_rng(0)
    B, T = 8, config.data.seq_len
    batch = {"tokens": rng.integers(0, config.model.vocab_size, (B, 1, T)).astype(np.int32),
             "extract": rng.integers(0, T, (B, 1)).astype(np.int32),
             "lengths": np.full((B, 1), T, np.int32),
             "label": rng.integers(0, 3, B).astype(np.int32),
             "weight": np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)}
    scores, _ = model.apply({"params": state.params}, batch["tokens"], batch["extract"])
    scores = np.asarray(scores, np.float64)
    log_probs = scores - scores.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(B), batch["label"]]
    steps = make_steps(model, schedule, "jit", evaluate=make_evaluate(False), eval_micro_batches=4)
    out = jax.device_get(steps.eval(state, batch))
    np.testing.assert_allclose(out["scores"], scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["label"], batch["label"])
    np.testing.assert_allclose(out["loss_sum"] / out["count"], (nll * batch["weight"]).sum() / 5, rtol=1e-5)


def test_eval_batch_size_is_checked():
    config = tiny_config(**{"data.batch_size": 16, "train.grad_accum_steps": 2})
    assert eval_micro_batch(config, num_devices=2) == 4
    config.train.eval_batch_size = 8
    assert eval_micro_batch(config, num_devices=2) == 8
    validate(config, num_devices=2)
    for bad in (3, -1, 16):
        config.train.eval_batch_size = bad
        with pytest.raises(ValueError, match=rf"train.eval_batch_size={bad} is not allowed: .* = 8"):
            validate(config, num_devices=2)
