"""Pre- vs post-LayerNorm x depth x learning-rate warmup: GPT-2's move of LayerNorm to the
input of each sub-block (plus a final LN), and why GPT-1's post-LN needed its warmup
(Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture").

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
    # GPT-1's block has no final LN (its last block ends in one); GPT-2's pre-LN needs one.
    c.zip = (("model.norm_position", ("post", "pre")), ("model.final_norm", (False, True)))
    c.product = (("model.n_layer", depths), ("optim.warmup_steps", warmups))
    return c
