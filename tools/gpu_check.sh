#!/usr/bin/env bash
# The prepared GPU check: `make bench-gpu` (installs requirements-gpu.txt and the test
# requirements into $VENV, default .venv, then tools/gpu_check.py: GPT-2 small in bfloat16 at
# seq 1024, the train step with cuDNN attention and with XLA's, the Hugging Face PyTorch peer
# eager and under torch.compile; tokens/s, MFU and peak memory each), then the cuda-marked tests.
#   tools/gpu_check.sh [FLAGS]            on a machine with an NVIDIA GPU (CUDA 12 driver)
#   tools/gpu_check.sh --dry_run [FLAGS]  the same path on this machine's CPU at a tiny shape: pip
#                                         only resolves the GPU requirements; no cuda test runs
# FLAGS go to tools/gpu_check.py (--attention=..., --batch_size=N).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
if [[ ${1:-} == --dry_run ]]; then
  export JAX_PLATFORMS=cpu
  "$PY" -m pip install -q --dry-run -r requirements-gpu.txt -r requirements-dev.txt
  "$PY" tools/gpu_check.py "$@"
else
  export JAX_PLATFORMS=cuda,cpu
  make bench-gpu VENV="$VENV" BENCH_GPU_FLAGS="$*"
fi
# tests/conftest.py deselects the cuda tests where jax's default backend is not a GPU: on a CPU,
# pytest's "no test selected" (exit status 5) is the expected end.
status=0
"$PY" -m pytest -q -m cuda tests || status=$?
[[ $status == 0 || ($JAX_PLATFORMS == cpu && $status == 5) ]]
