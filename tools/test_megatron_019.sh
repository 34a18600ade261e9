#!/usr/bin/env bash
# The megatron-core 0.19 leg: a Python 3.12 venv (.venv312; megatron-core 0.19 needs Python >= 3.12) with
# megatron-core 0.19.x and the rest of the CPU stack, then tests/test_megatron.py in it. Not part of .ci/run:
# PyPI has no CPU torch for Python 3.12 (this machine's CPU wheel is cp311 only), so the venv pulls torch's CUDA
# build and its nvidia-* wheels (several GB; measured figures in docs/megatron.md, "megatron-core versions").
# Usage: tools/test_megatron_019.sh [pytest args]; PYTHON312=/path/to/python3.12 to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON312:-$(command -v python3.12 || echo /root/.pyenv/versions/3.12.1/bin/python)}
[ -x .venv312/bin/python ] || "$PY" -m venv .venv312
pins=$(grep -v -E '^(torch|megatron-core|numpy)==' constraints/cpu.txt)
# setup.cfg admits the megatron-core range the main suite tested; this leg installs dist_peft without deps.
.venv312/bin/python -m pip install -q -c <(echo "$pins") "megatron-core>=0.19,<0.20" "torch>=2.6,<=2.14.1" \
    deepspeed transformers datasets safetensors pyyaml tqdm gguf nvidia-ml-py pytest peft scipy
.venv312/bin/python -m pip install -q --no-deps -e .
.venv312/bin/python -m pip install -q --no-deps -r constraints/packaged.txt
.venv312/bin/python -c "import megatron.core, torch; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false CUDA_VISIBLE_DEVICES=""
exec .venv312/bin/python -m pytest -q tests/test_megatron.py "$@"
