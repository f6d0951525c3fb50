"""GPT-1's fine-tuning model and objective: the pre-trained stack, a linear classifier on
the hidden state at [extract], and L3 = L2 (task) + lambda * L1 (language modelling).

The classifier model subclasses GPT, so its parameters are GPT's (wte, h_0, ...) plus
`clf`: a pre-trained run's parameters load into it by name.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt import ops
from gpt.model import GPT

CLF_INIT_STD = 0.02  # the released code's classifier initialisation


class GPTClassifier(GPT):
    """tokens_BxCxT, extract_BxC -> (scores, LM logits or None).

    scores: B x num_outputs for classification and entailment (C = 1) and similarity
    (C = 2 orders, hidden states summed); B x C for multiple choice (one score per answer).
    num_outputs == 1 makes the score a regression output (STS-B)."""

    num_outputs: int = 2
    num_sequences: int = 1  # C: 2 for similarity, the number of answers for multiple choice
    multiple_choice: bool = False
    clf_pdrop: float = 0.1

    @property
    def uses_dropout(self) -> bool:
        return super().uses_dropout or self.clf_pdrop > 0

    def example_inputs(self, seq_len: int) -> tuple:
        return (jnp.zeros((1, self.num_sequences, seq_len), jnp.int32),
                jnp.zeros((1, self.num_sequences), jnp.int32))

    def setup(self):
        super().setup()
        self.clf = nn.Dense(1 if self.multiple_choice else self.num_outputs,
                            kernel_init=nn.initializers.normal(CLF_INIT_STD),
                            bias_init=nn.initializers.zeros, name="clf")
        self.clf_drop = nn.Dropout(self.clf_pdrop)

    def __call__(self, tokens_BxCxT, extract_BxC, deterministic: bool = True, lm: bool = False):
        B, C, T = tokens_BxCxT.shape
        h_NxTxD = self.hidden_states(tokens_BxCxT.reshape(B * C, T), deterministic)
        h_BxCxD = h_NxTxD[jnp.arange(B * C), extract_BxC.reshape(-1)].reshape(B, C, -1)
        if self.multiple_choice:
            h_BxCxD = self.clf_drop(h_BxCxD, deterministic=deterministic)
            scores = self.clf(h_BxCxD)[..., 0]
        else:
            h_BxD = self.clf_drop(h_BxCxD.sum(axis=1), deterministic=deterministic)
            scores = self.clf(h_BxD)
            if self.num_outputs == 1:
                scores = scores[:, 0]
        lm_logits = self.logits(h_NxTxD).reshape(B, C, T, -1) if lm else None
        return scores.astype(jnp.float32), lm_logits


def _task_loss_BxN(scores, labels_B, regression: bool):
    if regression:
        return jnp.square(scores - labels_B)
    return optax.softmax_cross_entropy_with_integer_labels(scores, labels_B.astype(jnp.int32))


def _lm_loss(lm_logits_BxCxTxV, tokens_BxCxT, lengths_BxC, nll):
    """The released code's auxiliary loss: next-token cross-entropy over each sequence's
    real tokens (the [extract] token included), averaged per sequence, then over sequences."""
    T = tokens_BxCxT.shape[-1]
    losses = nll(lm_logits_BxCxTxV[..., :-1, :], tokens_BxCxT[..., 1:])
    mask = jnp.arange(1, T)[None, None, :] < lengths_BxC[..., None]
    per_sequence = (losses * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1)
    return per_sequence.mean()


def make_loss(lm_coef: float, regression: bool, nll=ops.nll):
    """The train_step Loss: task loss plus lm_coef x LM loss (`nll`: the model's ops' loss);
    with lm_coef 0 the LM head is not even run."""

    def loss(params, apply_fn, batch, rng, train: bool):
        scores, lm_logits = apply_fn(
            {"params": params}, batch["tokens"], batch["extract"], deterministic=not train,
            lm=lm_coef > 0, rngs={"dropout": rng} if train else None)
        task = _task_loss_BxN(scores, batch["label"], regression).mean()
        if lm_coef == 0:
            return task, {"task_loss": task}
        lm = _lm_loss(lm_logits, batch["tokens"], batch["lengths"], nll)
        return task + lm_coef * lm, {"task_loss": task, "lm_loss": lm}

    return loss


def make_evaluate(regression: bool):
    """The eval step: the task loss over the real examples and every example's scores."""

    def evaluate(params, apply_fn, batch):
        scores, _ = apply_fn({"params": params}, batch["tokens"], batch["extract"])
        losses = _task_loss_BxN(scores, batch["label"], regression)
        weight = batch["weight"]
        return {"loss_sum": (losses * weight).sum(), "count": weight.sum(), "scores": scores,
                "label": batch["label"], "weight": weight}

    return evaluate


def load_pretrained(fresh, pretrained):
    """`fresh` (the classifier's initial parameters) with every parameter the pre-trained
    model has. The token embedding keeps its pre-trained rows and its fresh rows after
    them: the special tokens, appended after the pre-trained table, start from the model's
    embedding init, N(0, model.init_std = 0.02), as the release's
    `np.random.randn(n_special, n_embd) * 0.02` (finetune-transformer-lm train.py)."""
    out = dict(fresh)
    for name, value in pretrained.items():
        if name not in out:
            raise ValueError(f"the pre-trained parameters have {name!r}, which this model lacks")
        out[name] = value
    table = pretrained["wte"]["embedding"]
    n = table.shape[0]
    out["wte"] = {"embedding": jnp.concatenate([jnp.asarray(table), fresh["wte"]["embedding"][n:]])}
    return jax.tree_util.tree_map(lambda f, p: np.asarray(p, dtype=f.dtype), fresh, out)
