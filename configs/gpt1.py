"""GPT-1 (Radford et al., 2018) as published; `:tiny` trains on 2 CPU cores in about a minute;
`:gpu` (one 80 GB GPU) and `:tpu` (one TPU v4 host, 4 chips) train it on accelerators.

python -m experiments.train --config=configs/gpt1.py[:tiny] --workdir=DIR
"""
from configs.base import get_base_config, on_accelerator

ACCELERATORS = {"gpu": ("gpu", 64), "tpu": ("tpu", 16)}  # platform, rows per device


def get_config(arg: str = ""):
    if arg in ACCELERATORS:
        return on_accelerator(get_config(""), *ACCELERATORS[arg])
    c = get_base_config()
    m = c.model
    m.vocab_size, m.max_len = 40478, 512
    m.n_layer, m.d_model, m.n_head, m.d_ff = 12, 768, 12, 3072
    m.norm_position, m.final_norm, m.scale_residual_init = "post", False, False
    m.embd_pdrop = m.resid_pdrop = m.attn_pdrop = 0.1
    c.data.tokenizer, c.data.bpe_merges = "bpe", 40000
    c.data.batch_size, c.data.seq_len = 64, 512
    o = c.optim
    o.lr, o.warmup_steps, o.schedule, o.end_lr = 2.5e-4, 2000, "cosine", 0.0
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.weight_decay, o.grad_clip = 0.01, 1.0
    c.train.epochs = 100.0
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 10, 500, 1000

    if arg == "tiny":
        m.vocab_size, m.max_len = 257, 128  # bytes plus end-of-text
        m.n_layer, m.d_model, m.n_head, m.d_ff = 2, 128, 4, 512
        m.embd_pdrop = m.resid_pdrop = m.attn_pdrop = 0.0
        c.data.tokenizer = "bytes"
        c.data.batch_size, c.data.seq_len = 16, 128
        o.lr, o.warmup_steps = 1e-3, 30  # post-LN diverges to unigram level at GPT-2 tiny's 3e-3
        c.train.epochs, c.train.steps = 0.0, 300
        c.train.log_every, c.train.eval_every, c.train.ckpt_every = 25, 100, 300
    elif arg:
        raise ValueError(f"configs/gpt1.py: unknown arg {arg!r}; allowed: '' (as published), tiny, "
                         f"{', '.join(ACCELERATORS)}")
    return c
