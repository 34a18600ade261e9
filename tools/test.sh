#!/usr/bin/env bash
# The test suite: installs if needed, then runs every test on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUDA_VISIBLE_DEVICES=""  # the CPU leg (what CI runs), also on a GPU machine; the GPU leg: tools/test_cuda.sh
exec .venv/bin/python -m pytest -q tests "$@"
