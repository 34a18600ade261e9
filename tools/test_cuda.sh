#!/usr/bin/env bash
# The GPU leg: the key equivalence tests on a CUDA device (tests marked `cuda`: tests/test_cuda.py), with
# deterministic algorithms where ops have them and the tolerances documented there. Run it first when a GPU is
# available (2 GPUs also run the NCCL data-parallel check). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA device visible to $PY (install the CUDA build of torch: README, Cluster install)" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
exec "$PY" -m pytest -q -m cuda tests "$@"
