#!/usr/bin/env bash
# The demo: installs if needed, then fine-tunes SmolLM2-135M-Instruct with LoRA on chatterbot-corpus
# (answer-only loss) for a few dozen steps on CPU. Extra arguments go to `dist-peft train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/dist-peft train --config configs/demo-smollm2-lora.yaml "$@"
