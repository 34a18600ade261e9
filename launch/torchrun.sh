#!/usr/bin/env bash
# Data-parallel training with torchrun. Every rank holds the model and its slice of each global batch;
# adapter gradients are summed in one coalesced all-reduce per step (nccl on GPUs, gloo on CPU).
#
# One node:   launch/torchrun.sh CONFIG [--set KEY=VALUE ...]                      (NPROC ranks, default 2)
# Many nodes: NNODES=2 NPROC=8 RDZV=host0:29500 launch/torchrun.sh CONFIG        (run on every node)
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG [--set KEY=VALUE ...]}
shift
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[ -x "$PY" ] || PY=python
args=(--nproc_per_node "${NPROC:-2}")
if [ -n "${RDZV:-}" ]; then
  args+=(--nnodes "${NNODES:?set NNODES with RDZV}" --rdzv_backend c10d --rdzv_endpoint "$RDZV" --rdzv_id "${RDZV_ID:-dist_peft}")
else
  args+=(--standalone)
fi
exec "$PY" -m torch.distributed.run "${args[@]}" -m dist_peft.train --config "$config" "$@"
