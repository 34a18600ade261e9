#!/usr/bin/env bash
# Training under the DeepSpeed launcher: one process per GPU (on CPU, NPROC processes), RANK, WORLD_SIZE,
# LOCAL_RANK, MASTER_ADDR and MASTER_PORT set by it. The config picks the engine: a `deepspeed:` section runs
# ZeRO (configs/tiny-lora-zero*.yaml), none the plain data-parallel engine.
#
# One node:    launch/deepspeed.sh CONFIG [--set KEY=VALUE ...]           (NPROC ranks, default 2)
# Many nodes:  HOSTFILE=hosts launch/deepspeed.sh CONFIG                  (run once, on the first host)
#              hosts holds one "hostname slots=N" line per node; the launcher reaches the others with
#              passwordless ssh + pdsh and MASTER_ADDR defaults to the first host.
#   no ssh:    HOSTFILE=hosts NODE_RANK=i MASTER_ADDR=host0 launch/deepspeed.sh CONFIG   (run on every node, i =
#              its line in hosts; the launcher's --no_ssh form: each node starts its own ranks, as torchrun does)
# Faults: the DeepSpeed launcher does not restart failed ranks, so this script does: a failed job is launched again
# up to MAX_RESTARTS times (default 3; 0: fail at once) and resumes from the newest verified checkpoint
# (train.resume: auto); exit code 2 (a config or file error, "error: ..." on stderr) is not retried.
set -euo pipefail
config=${1:?usage: launch/deepspeed.sh CONFIG [--set KEY=VALUE ...]}
shift
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[ -x "$PY" ] || PY=python
args=(--master_port "${MASTER_PORT:-29500}" --log_level warning)  # its own INFO lines off; rank 0 speaks
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -f "$HOSTFILE" ]; then
    echo "error: HOSTFILE=$HOSTFILE: no such file (write one 'hostname slots=N' line per node)" >&2
    exit 2
  fi
  hosts=$(grep -E '^[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOSTFILE" | awk '{print $1}')
  if [ -z "$hosts" ]; then
    echo "error: HOSTFILE=$HOSTFILE lists no 'hostname slots=N' line" >&2
    exit 2
  fi
  args+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$(head -n1 <<<"$hosts")}")
  if [ -n "${NODE_RANK:-}" ]; then
    args+=(--no_ssh --node_rank "$NODE_RANK")
  elif [ "$(wc -l <<<"$hosts")" -eq 1 ]; then
    args+=(--no_ssh_check)  # one host: the launcher starts its ranks locally and needs no ssh
  elif ! command -v pdsh >/dev/null 2>&1; then
    echo "error: HOSTFILE=$HOSTFILE lists $(wc -l <<<"$hosts") hosts: the DeepSpeed launcher starts them with pdsh over" \
      "passwordless ssh, and pdsh is not installed (install it, and ssh keys between the hosts; or run this on every" \
      "host with NODE_RANK=i)" >&2
    exit 2
  fi
else
  args+=(--num_gpus "${NPROC:-2}")
fi
for ((attempt = 0; ; attempt++)); do
  rc=0
  DIST_PEFT_RESTART_COUNT=$attempt "$PY" -m dist_peft.integrations.deepspeed_launch "${args[@]}" --no_local_rank \
    --module dist_peft.train --config "$config" "$@" || rc=$?
  if [ "$rc" -eq 0 ] || [ "$rc" -eq 2 ] || [ "$attempt" -ge "${MAX_RESTARTS:-3}" ]; then exit "$rc"; fi
  echo "launch/deepspeed.sh: the job failed (exit $rc); restart $((attempt + 1)) of ${MAX_RESTARTS:-3}" >&2
done
