"""Continue a prompt with a trained model, printing the text as it is generated.

python -m experiments.sample --workdir=/tmp/run1 --prompt="The with statement" \
    --max_new_tokens=200 [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0 --num_samples=2]

An empty --prompt samples unconditionally (after an end-of-text token, as GPT-2 did).
Sampling speed beside Hugging Face's `generate`: python -m experiments.bench --what=sample.
"""
from __future__ import annotations

import sys

import jax
from absl import flags

from experiments import common
from gpt import data, sampling

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue; empty: unconditional.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "New tokens per sample, at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens; 0: all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus: the smallest set of tokens with this much "
                            "probability, in (0, 1]; 1: all.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed gives the same text.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples to draw, one after another.")
_CHUNK = flags.DEFINE_integer("chunk", 8, "Tokens generated between two prints.")


def _stable_text(tokenizer, tokens: list[int]) -> str:
    """The text so far, without trailing bytes of a character that is not complete yet."""
    return tokenizer.decode(tokens).rstrip("\ufffd")


def sample(workdir: str) -> None:
    out = sys.stdout
    if not workdir:
        raise ValueError("--workdir is required: a training run's directory")
    if _NUM_SAMPLES.value < 1:
        raise ValueError(f"--num_samples={_NUM_SAMPLES.value} is not allowed: a positive integer")
    if _SEED.value < 0:
        raise ValueError(f"--seed={_SEED.value} is not allowed: a non-negative integer")
    sampling.check_settings(_MAX_NEW.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    config, model, params = common.load_run(workdir)
    if _TOP_K.value > model.cfg.vocab_size:
        raise ValueError(f"--top_k={_TOP_K.value} is not allowed: at most the model's vocabulary "
                         f"({model.cfg.vocab_size}; 0: off)")
    tokenizer = data.get_tokenizer(config.data, common.to_stderr)
    common.check_vocabulary(tokenizer, config)
    prompt = tokenizer.encode(_PROMPT.value).tolist() or [tokenizer.eot_id]
    room = model.cfg.max_len - len(prompt)
    if 0 < room < _MAX_NEW.value:
        print(f"note: only {room} new tokens fit the model's context of {model.cfg.max_len}",
              file=sys.stderr)
    rng = jax.random.key(_SEED.value)
    for i in range(_NUM_SAMPLES.value):
        if _NUM_SAMPLES.value > 1:
            out.write(f"{'=' * 20} sample {i + 1} {'=' * 20}\n")
        out.write(_PROMPT.value)
        new, printed = [], 0
        for rows in sampling.stream(
                model, params, [prompt], max_new_tokens=_MAX_NEW.value,
                rng=jax.random.fold_in(rng, i), temperature=_TEMPERATURE.value,
                top_k=_TOP_K.value, top_p=_TOP_P.value, eot_id=tokenizer.eot_id,
                chunk=_CHUNK.value):
            new += [t for t in rows[0].tolist() if t != tokenizer.eot_id]
            text = _stable_text(tokenizer, new)
            out.write(text[printed:])
            out.flush()
            printed = max(printed, len(text))
        out.write(tokenizer.decode(new)[printed:] + "\n")
        out.flush()


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    sample(_WORKDIR.value)


if __name__ == "__main__":
    common.run_program(main)
