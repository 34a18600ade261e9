#!/usr/bin/env bash
# Data-parallel training with torchrun. Every rank holds the model and its slice of each global batch;
# adapter gradients are summed in one coalesced all-reduce per step (nccl on GPUs, gloo on CPU).
#
# One node:   launch/torchrun.sh CONFIG [--set KEY=VALUE ...]                      (NPROC ranks, default 2)
# Many nodes: NNODES=2 NPROC=8 RDZV=host0:29500 launch/torchrun.sh CONFIG        (run on every node)
#             (two "nodes" on one machine: run it twice with RDZV=127.0.0.1:PORT)
# Faults: a rank that fails (or a node whose agent is gone) makes torchrun restart the whole worker group, up to
# MAX_RESTARTS times (default 3; 0: fail at once); the restarted ranks resume from the newest verified checkpoint
# (train.resume: auto). A node restarted by the scheduler rejoins the rendezvous and resumes the same way.
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG [--set KEY=VALUE ...]}
shift
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[ -x "$PY" ] || PY=python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # torchrun's own default, set here so that it need not warn
# torch's agent shares one TCPStore with its workers across restarts, and a restarted process group would read the
# failed attempt's addresses from it (gloo: "connection refused"): one store per attempt instead.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
args=(--nproc_per_node "${NPROC:-2}" --max-restarts "${MAX_RESTARTS:-3}")
if [ -n "${RDZV:-}" ]; then
  args+=(--nnodes "${NNODES:?set NNODES with RDZV}" --rdzv_backend c10d --rdzv_endpoint "$RDZV" --rdzv_id "${RDZV_ID:-dist_peft}")
else
  args+=(--standalone)
fi
exec "$PY" -m torch.distributed.run "${args[@]}" -m dist_peft.train --config "$config" "$@"
