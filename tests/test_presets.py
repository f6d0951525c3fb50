"""The accelerator presets: the papers' global batches in bfloat16, in micro-batches that fit."""
import pytest

from configs import base, gpt1, gpt2
from gpt import flops
from gpt.config import eval_micro_batch, validate

GiB = 2**30
# (config module, arg, as published, device memory): an 80 GB GPU; a TPU v4 chip's 32 GiB.
PRESETS = [(gpt2, "small-gpu", "small", 80e9), (gpt2, "small-tpu", "small", 32 * GiB),
           (gpt1, "gpu", "", 80e9), (gpt1, "tpu", "", 32 * GiB)]


@pytest.mark.parametrize("module, arg, published, memory", PRESETS)
def test_preset_keeps_the_paper_and_fits(module, arg, published, memory):
    preset, paper = module.get_config(arg), module.get_config(published)
    devices = base.PRESET_DEVICES[arg.rsplit("-", 1)[-1]]
    cfg = validate(preset, devices)
    assert (cfg.dtype, cfg.param_dtype, cfg.attn_pdrop) == ("bfloat16", "float32", 0.0)
    assert (preset.data.batch_size, preset.data.seq_len) == (paper.data.batch_size, paper.data.seq_len)
    assert cfg.resid_pdrop == paper.model.resid_pdrop and cfg.embd_pdrop == paper.model.embd_pdrop
    rows = eval_micro_batch(preset, devices)
    assert rows * devices * preset.train.grad_accum_steps == paper.data.batch_size
    n_params = flops.count_params(flops.param_shapes(cfg))
    need = flops.memory_per_device(cfg, n_params, rows, preset.data.seq_len, fsdp=devices)
    assert sum(need.values()) < 0.7 * memory  # headroom for XLA's workspace and fragmentation
