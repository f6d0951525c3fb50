"""GPT-2 (Radford et al., 2019): small | medium | large | xl, `tiny` for CPU, and GPT-2 small on
accelerators: `small-gpu` (one 80 GB GPU) and `small-tpu` (one TPU v4 host, 4 chips).

The paper gives no optimiser settings; these are nanoGPT's, which reproduce GPT-2 small.
python -m experiments.train --config=configs/gpt2.py:small --workdir=DIR
"""
from configs.base import get_base_config, on_accelerator

SIZES = {  # n_layer, d_model, n_head
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
    "xl": (48, 1600, 25),
    "tiny": (2, 128, 4),
}


ACCELERATORS = {"small-gpu": ("gpu", 16), "small-tpu": ("tpu", 8)}  # platform, rows per device


def get_config(arg: str = "small"):
    if arg in ACCELERATORS:
        return on_accelerator(get_config("small"), *ACCELERATORS[arg])
    if arg not in SIZES:
        raise ValueError(f"configs/gpt2.py: unknown size {arg!r}; allowed: "
                         f"{', '.join([*SIZES, *ACCELERATORS])}")
    c = get_base_config()
    m = c.model
    m.n_layer, m.d_model, m.n_head = SIZES[arg]
    m.d_ff = 4 * m.d_model
    m.vocab_size, m.max_len = 50257, 1024
    m.wpe_init_std = 0.01  # the released code's position table (model.py); HF's port uses 0.02
    m.norm_position, m.final_norm, m.scale_residual_init = "pre", True, True
    m.embd_pdrop = m.resid_pdrop = m.attn_pdrop = 0.0  # the released code has no dropout
    c.data.tokenizer = "gpt2"
    c.data.batch_size, c.data.seq_len = 512, 1024
    c.train.grad_accum_steps = 64  # micro-batches of 8 x 1024
    o = c.optim
    o.lr, o.warmup_steps, o.schedule, o.end_lr = 6e-4, 2000, "cosine", 6e-5
    o.b1, o.b2, o.eps = 0.9, 0.95, 1e-8
    o.weight_decay, o.grad_clip = 0.1, 1.0
    c.train.steps = 600000
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 10, 1000, 1000

    if arg == "tiny":
        m.vocab_size, m.max_len = 257, 128
        c.data.tokenizer = "bytes"
        c.data.batch_size, c.data.seq_len = 16, 128
        c.train.grad_accum_steps = 1
        o.lr, o.warmup_steps, o.end_lr, o.weight_decay = 3e-3, 30, 3e-4, 0.01
        c.train.steps = 300
        c.train.log_every, c.train.eval_every, c.train.ckpt_every = 25, 100, 300
    return c
