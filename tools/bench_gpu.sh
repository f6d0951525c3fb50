#!/usr/bin/env bash
# `make bench`'s two shapes on a GPU, bf16 compute (float32 parameters), in under 5 minutes:
# train step (tokens/s, MFU against a bf16 matmul measured in the same run, compile time,
# device peak memory) and sampling. The peer (CPU PyTorch) is not run: no like-for-like.
# Needs jax[cuda12]==0.10.2 in the venv; run from anywhere: tools/bench_gpu.sh [extra flags].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
COMMON=(--config=configs/gpt2.py:small --config.model.dtype=bfloat16 --warmup=3 --repeats=20)

"$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu" and f"no GPU: jax sees {jax.devices()}")'
"$PY" -m experiments.bench "${COMMON[@]}" --config.data.seq_len=512 --config.data.batch_size=4 \
    --what=train,sample "$@"
"$PY" -m experiments.bench "${COMMON[@]}" --config.model.n_layer=4 --config.model.d_model=256 \
    --config.model.n_head=4 --config.model.d_ff=1024 --config.data.seq_len=256 \
    --config.data.batch_size=8 --what=train "$@"
