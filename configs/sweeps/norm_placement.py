"""Pre- vs post-LayerNorm x depth x learning-rate warmup: GPT-2's move of LayerNorm to the
input of each sub-block (plus a final LN), and why a post-LN block needs warmup
(Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture").

One variable at a time: the post-LN and pre-LN runs differ only in where LayerNorm sits
(model.norm_position) and in the final LN that only pre-LN needs (a post-LN stack already
ends in one). Everything else is the base config's, GPT-2's, in both: residual projections
initialised at 0.02 / sqrt(2 x n_layer), no dropout, GPT-2's AdamW (b2 0.95, cosine decay,
clipping 1.0). So the post-LN runs are post-LN GPT-2 blocks, not GPT-1's (GPT-1 has neither
the scaled init nor b2 0.95); configs/sweeps/gpt1_vs_gpt2.py starts from GPT-1 instead.

python -m experiments.sweep --config=configs/sweeps/norm_placement.py:tiny --workdir=runs/norm_placement_tiny

`:tiny` is 8 runs of 300 steps on CPython's documentation bytes, d_model 128: 15 to 30 minutes
on 2 CPU cores (28 measured while other jobs shared them; the 6-layer runs take 3/4 of it).
Its lr is GPT-1 tiny's 1e-3 rather than GPT-2 tiny's 3e-3, at which post-LN with 30 warmup
steps stalls at the unigram level; at 1e-3 depth and warmup decide the outcome. The default
is GPT-2 small's shapes and optimiser for an accelerator, 1.3B tokens a run: on the small
default corpus that is many epochs, so add a larger corpus (data.name) to `overrides`.
"""
import ml_collections


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    if arg == "tiny":
        c.base = "configs/gpt2.py:tiny"
        c.overrides = (("optim.lr", 1e-3), ("optim.end_lr", 1e-4), ("train.eval_every", 50))
        depths, warmups = (2, 6), (0, 100)
    elif not arg:
        c.base = "configs/gpt2.py:small"
        c.overrides = (("data.batch_size", 64), ("train.grad_accum_steps", 8), ("train.steps", 20000),
                       ("train.eval_every", 500))
        depths, warmups = (12, 24), (0, 2000)
    else:
        raise ValueError(f"configs/sweeps/norm_placement.py: unknown arg {arg!r}; allowed: '' (GPT-2 small), tiny")
    # post-LN (the block of GPT-1 and of the original Transformer) has no final LN: its last
    # block ends in one. Pre-LN (GPT-2's) needs one.
    c.zip = (("model.norm_position", ("post", "pre")), ("model.final_norm", (False, True)))
    c.product = (("model.n_layer", depths), ("optim.warmup_steps", warmups))
    return c
