"""Optional speed for the CPU backend: C++ kernels over XLA FFI (attention, the tied head and its
loss, MKL's matmul for the dense layers, the AdamW update) and XLA CPU compiler options.

Nothing else in gpt/ imports this package: programs ask it for `ops()`, a gpt.ops bundle whose
members run the kernels where a step is lowered for CPU (jax.lax.platform_dependent) and XLA's
reference ops wherever else the same step is lowered. Without it, or where the kernels cannot be
built, the reference ops run everywhere: slower on CPU, the same numbers to rounding.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection

from gpt.cpu import adamw, attention, build, cross_entropy, matmul
from gpt.cpu.compiler import CPU_COMPILER_OPTIONS
from gpt.config import CPU_KERNELS
from gpt.ops import REFERENCE, Ops

__all__ = ["CPU_COMPILER_OPTIONS", "ops"]


def ops(base: Ops = REFERENCE, kernels: Collection[str] = CPU_KERNELS) -> Ops:
    """`base` with those of `kernels` (gpt.config.CPU_KERNELS) that can run here; `base` itself
    where none can be built."""
    if not build.available():
        return base
    use = set(kernels)
    changes = {}
    if "attention" in use:
        changes.update(causal_attention=attention.causal_attention(base.causal_attention),
                       cached_attention=attention.cached_attention(base.cached_attention))
    mkl = "matmul" in use and matmul.loaded()
    if mkl:
        changes.update(dot_general=matmul.dot_general,
                       tied_head_logits=matmul.tied_head_logits(base.tied_head_logits))
    if "cross_entropy" in use:
        changes.update(nll=cross_entropy.nll(base.nll),
                       tied_head_nll=cross_entropy.tied_head_nll(base.tied_head_nll, mkl=mkl))
    if "adamw" in use:
        changes.update(adamw=adamw.adamw)
    return dataclasses.replace(base, **changes)
