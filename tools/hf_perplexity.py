"""A downloaded Hugging Face checkpoint's perplexity on a paragraph, ours against HF's PyTorch
model: the suite's equivalence tests use random weights; this checks OpenAI's released ones.

hf download gpt2 --local-dir hf/gpt2   (or openai-gpt, gpt2-medium, ...)
python tools/hf_perplexity.py hf/gpt2
"""
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from gpt import convert  # noqa: E402
from gpt.model import GPT  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst "
        "of times, it was the age of wisdom, it was the age of foolishness, it was the epoch of "
        "belief, it was the epoch of incredulity, it was the season of Light, it was the season "
        "of Darkness, it was the spring of hope, it was the winter of despair.")


def main(path: pathlib.Path) -> None:
    cfg, params = convert.from_hf(path)
    print(f"{path}: {json.loads((path / 'config.json').read_text())['model_type']}, "
          f"{cfg.n_layer} layers, d_model {cfg.d_model}")
    ids = AutoTokenizer.from_pretrained(path)(TEXT)["input_ids"][:cfg.max_len]
    tokens_1xT = np.asarray([ids], np.int32)
    logits = GPT(cfg).apply({"params": params}, tokens_1xT)
    ours = float(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens_1xT[:, 1:]).mean())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens_1xT).long(), labels=torch.from_numpy(tokens_1xT).long()).loss.item()
    print(f"perplexity: ours {np.exp(ours):.4f}, Hugging Face {np.exp(theirs):.4f}")
    if not jnp.isclose(np.exp(ours), np.exp(theirs), rtol=1e-4):
        raise SystemExit("error: the perplexities differ by more than 1e-4 (relative)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(pathlib.Path(sys.argv[1]))
