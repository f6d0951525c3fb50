"""Parameter counts, FLOPs per token and model FLOPs utilisation."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.ops import REFERENCE, Ops


def param_shapes(cfg: GPTConfig):
    """The parameter pytree as ShapeDtypeStructs: nothing is allocated."""
    init = lambda: GPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))  # noqa: E731
    return jax.eval_shape(init)["params"]


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def matmul_params(cfg: GPTConfig, n_params: int) -> int:
    """Parameters that take part in a matmul per token: all but the position table
    (a lookup); the token table counts once, as the output head (nanoGPT's N)."""
    lookups = cfg.max_len + (0 if cfg.tie_embeddings else cfg.vocab_size)
    return n_params - lookups * cfg.d_model


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token, forward and backward: 6N + 12*L*T*d (PaLM, appendix B)."""
    return 6 * matmul_params(cfg, n_params) + 12 * cfg.n_layer * seq_len * cfg.d_model


# Published dense (no sparsity) peak FLOP/s per chip, by a part of jax's `device_kind`, the
# most specific first: (name, 16-bit, float32). float32 matmuls run as TF32 on NVIDIA tensor
# cores and as one bfloat16 pass on TPU at XLA's default precision, so those are their peaks.
# Sources: NVIDIA's A100, H100/H200 and HGX B200 datasheets; Google Cloud's TPU system pages.
DATASHEET_PEAKS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("H200 NVL", 835e12, 418e12),
    ("H100", 989e12, 495e12),  # SXM
    ("H200", 989e12, 495e12),  # SXM, and GH200
    ("B200", 2.25e15, 1.1e15),
    ("A100", 312e12, 156e12),
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),  # v5e
    ("TPU v5e", 197e12, 197e12),
    ("TPU v5", 459e12, 459e12),  # v5p
    ("TPU v6 lite", 918e12, 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12, 918e12),
)


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    """The published dense peak of one chip for matmuls in `dtype`; None if not in the table."""
    for name, half, single in DATASHEET_PEAKS:
        if name.lower() in device_kind.lower():
            return single if dtype == "float32" else half
    return None


def peak_flops(dtype: str, configured: float = 0.0, ops: Ops = REFERENCE,
               compiler_options: dict | None = None) -> tuple[float, str]:
    """(per-device peak FLOP/s, where it comes from): the configured value, else the device's
    datasheet, else the fastest of several square matmuls in `dtype` measured now (a CPU has
    no datasheet figure that its matmuls reach)."""
    if configured:
        return configured, "train.peak_flops"
    kind = jax.devices()[0].device_kind
    peak = datasheet_peak(kind, dtype)
    if peak is not None:
        return peak, f"{kind} datasheet, dense {dtype}"
    return (measure_matmul_flops(dtype=dtype, ops=ops, compiler_options=compiler_options),
            f"fastest {dtype} matmul measured on {kind} at start-up")


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops: float) -> float:
    return tokens_per_s * flops_per_tok / peak_flops


def measure_matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32, ops: Ops = REFERENCE,
                         compiler_options: dict | None = None) -> float:
    """Achieved FLOP/s of one square matmul on the default device, the fastest of `repeats`
    runs of XLA's default kernels and the train step's products (its ops' dot_general under
    its compiler options): the MFU denominator where no datasheet peak applies."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    product = lambda x: ops.dot_general(x, x, (((1,), (0,)), ((), ())))  # noqa: E731
    candidates = [jax.jit(lambda x: x @ x), jax.jit(product, compiler_options=compiler_options)]
    best = float("inf")
    for product in candidates:
        product(a).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            product(a).block_until_ready()
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def measure_matvec_bandwidth(rows: int = 50257, cols: int = 768, repeats: int = 10,
                             dtype=jnp.float32) -> float:
    """Bytes/s that a matrix-vector product streams from memory (default shape: GPT-2's
    output embedding, far larger than any cache). A batch-1 decoding step reads every
    weight once, so weight bytes / this bounds its tokens/s from above."""
    w = jax.random.normal(jax.random.PRNGKey(0), (rows, cols), dtype)
    x = jnp.ones((cols,), dtype)
    matvec = jax.jit(lambda w, x: w @ x)
    matvec(w, x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matvec(w, x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return w.nbytes / best


def memory_per_device(cfg: GPTConfig, n_params: int, batch_per_device: int, seq_len: int,
                      fsdp: int = 1) -> dict[str, float]:
    """Bytes per device of a training step, estimated: float32 parameters, gradients and
    Adam's two moments (sharded `fsdp` ways), plus activations kept for the backward pass
    (Korthikanti et al. 2022's per-layer count, adjusted for `cfg.remat`) and float32 logits."""
    act_bytes = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    sbh = batch_per_device * seq_len * cfg.d_model
    scores = batch_per_device * cfg.n_head * seq_len * seq_len
    full_layer = (17 * sbh + 2.5 * scores) * act_bytes  # all a block's activations
    per_layer = {"none": full_layer, "dots": 9 * sbh * act_bytes, "full": sbh * act_bytes}[cfg.remat]
    recompute = 0 if cfg.remat == "none" else full_layer  # one block rebuilt at a time
    return {
        "parameters": 4 * n_params / fsdp,
        "gradients": 4 * n_params / fsdp,
        "adam moments": 8 * n_params / fsdp,
        "activations": cfg.n_layer * per_layer + recompute,
        "logits": 2 * 4 * batch_per_device * seq_len * cfg.vocab_size,
    }
