"""On an NVIDIA GPU (tools/gpu_check.sh): the train step agrees with the CPU's, `auto` attention is
cuDNN's, and the presets' steps fit in the memory they were sized for, as XLA's GPU compiler
assigns it."""
import jax
import numpy as np
import pytest

from configs import gpt2
from gpt.parallel import make_steps
from tests.helpers import batches, compiled_memory, max_relative_error, model_and_state, tiny_config

pytestmark = pytest.mark.cuda


def test_train_step_on_the_gpu_matches_the_cpu():
    config = tiny_config()
    results = {}
    for platform in ("gpu", "cpu"):
        with jax.default_device(jax.devices(platform)[0]), jax.default_matmul_precision("highest"):
            model, schedule, state = model_and_state(config)
            steps = make_steps(model, schedule, "jit")
            for batch in batches(config, 2):
                state, metrics = steps.train(state, batch)
            results[platform] = jax.device_get((state.params, metrics["loss"]))
    assert max_relative_error(results["gpu"][0], results["cpu"][0]) < 1e-4
    np.testing.assert_allclose(results["gpu"][1], results["cpu"][1], rtol=1e-5)


def test_gpt2_small_gpu_preset_fits_80gb_and_eval_fits_in_train():
    train, evaluate = compiled_memory(gpt2.get_config("small-gpu"))
    used = train.temp_size_in_bytes + train.argument_size_in_bytes + train.output_size_in_bytes
    print(f"small-gpu train step: {used / 2**30:.1f} GiB; eval temporaries "
          f"{evaluate.temp_size_in_bytes / 2**30:.1f} GiB")
    assert used < 0.8 * 80e9
    assert evaluate.temp_size_in_bytes <= train.temp_size_in_bytes


def test_auto_attention_is_cudnn_on_the_gpu_and_agrees_with_xla():
    losses = {}
    for attention in ("auto", "xla"):
        config = tiny_config(**{"model.dtype": "bfloat16", "model.attention": attention,
                                "model.d_model": 64, "model.d_ff": 256})
        model, schedule, state = model_and_state(config)
        batch = batches(config, 1)[0]
        compiled = make_steps(model, schedule, "jit").train.lower(state, batch).compile()
        assert ("__cudnn$fmha" in compiled.as_text()) == (attention == "auto"), attention
        losses[attention] = float(compiled(state, batch)[1]["loss"])
    np.testing.assert_allclose(losses["auto"], losses["xla"], rtol=2e-2)
