"""GPT-1 (Radford et al., 2018) as published; `:tiny` trains on 2 CPU cores in about a minute.

python -m experiments.train --config=configs/gpt1.py[:tiny] --workdir=DIR

Each value's source is marked: "paper" (section 4.1 of the paper), "release" (OpenAI's
fine-tuning code, openai/finetune-transformer-lm: its model code and train.py's defaults;
the pre-training code was never released) or "ours" (in neither).
"""
from configs.base import get_base_config


def get_config(arg: str = ""):
    c = get_base_config()
    # vocab_size: release (its encoder_bpe_40000.json has 40,478 ids: the paper's 40,000 BPE
    # merges on 478 base symbols). max_len 512: paper ("sequences of 512 tokens").
    m = c.model
    m.vocab_size, m.max_len = 40478, 512
    m.n_layer, m.d_model, m.n_head, m.d_ff = 12, 768, 12, 3072  # paper
    # post-LN, no final LN: the release's block (the paper's figure 1); no scaled init: paper
    # (N(0, 0.02) everywhere, model.init_std).
    m.norm_position, m.final_norm, m.scale_residual_init = "post", False, False
    m.embd_pdrop = m.resid_pdrop = m.attn_pdrop = 0.1  # paper
    # bpe_merges: paper. The tokenizer is ours: BPE learned on the training corpus with HF
    # tokenizers; GPT-1 learned it on BooksCorpus after ftfy and spaCy's word splitting.
    c.data.tokenizer, c.data.bpe_merges = "bpe", 40000
    c.data.batch_size, c.data.seq_len = 64, 512  # paper
    o = c.optim
    o.lr, o.warmup_steps, o.schedule, o.end_lr = 2.5e-4, 2000, "cosine", 0.0  # paper
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8  # release (the paper says only "Adam")
    # weight_decay: paper ("modified L2 regularization ... w = 0.01 on all non bias or gain
    # weights"). grad_clip: ours; the paper names no clipping in pre-training (the release
    # clips fine-tuning at 1.0).
    o.weight_decay, o.grad_clip = 0.01, 1.0
    c.train.epochs = 100.0  # paper
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 10, 500, 1000  # ours

    if arg == "tiny":  # ours: shapes and rates for 2 CPU cores
        m.vocab_size, m.max_len = 257, 128  # bytes plus end-of-text
        m.n_layer, m.d_model, m.n_head, m.d_ff = 2, 128, 4, 512
        m.embd_pdrop = m.resid_pdrop = m.attn_pdrop = 0.0
        c.data.tokenizer = "bytes"
        c.data.batch_size, c.data.seq_len = 16, 128
        o.lr, o.warmup_steps = 1e-3, 30  # post-LN diverges to unigram level at GPT-2 tiny's 3e-3
        c.train.epochs, c.train.steps = 0.0, 300
        c.train.log_every, c.train.eval_every, c.train.ckpt_every = 25, 100, 300
    elif arg:
        raise ValueError(f"configs/gpt1.py: unknown arg {arg!r}; allowed: '' (as published), tiny")
    return c
