"""GPT-1 with each of GPT-2's changes applied alone, then all of them together.

python -m experiments.sweep --config=configs/sweeps/gpt1_vs_gpt2.py:tiny --workdir=runs/gpt1_vs_gpt2_tiny

Context length changes keep the tokens per step (fewer, longer sequences). The vocabulary
changes what a token is, so those runs' losses are per GPT-2 token, not comparable with the
others' without converting to bits per byte. In `:tiny` (GPT-1 tiny: 2 layers, d_model 128,
bytes) the GPT-2 vocabulary makes the output layer ~15x the rest of the model, and those two
runs take most of the sweep's time.
"""
import ml_collections


def get_config(arg: str = ""):
    if arg not in ("", "tiny"):
        raise ValueError(f"configs/sweeps/gpt1_vs_gpt2.py: unknown arg {arg!r}; allowed: '' (as published), tiny")
    c = ml_collections.ConfigDict()
    c.base = "configs/gpt1.py:tiny" if arg else "configs/gpt1.py"
    tokens_per_step = 16 * 128 if arg else 64 * 512
    changes = {
        "pre_ln": {"model.norm_position": "pre", "model.final_norm": True},
        "scaled_init": {"model.scale_residual_init": True},
        "ctx1024": {"model.max_len": 1024, "data.seq_len": 1024,
                    "data.batch_size": tokens_per_step // 1024},
        "gpt2_vocab": {"data.tokenizer": "gpt2", "model.vocab_size": 50257},
    }
    c.variants = (("gpt1", {}), *changes.items(),
                  ("gpt2", {k: v for change in changes.values() for k, v in change.items()}))
    return c
