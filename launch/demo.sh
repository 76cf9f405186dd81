#!/usr/bin/env bash
# The main job on the embedded default: set up, then train + evaluate 12 TopK SAEs on
# SmolLM2-135M-Instruct from offline ShareGPT chats on CPU, and write the report (runs/demo).
# Extra arguments are Hydra overrides, e.g. `bash launch/demo.sh train.tokens=100000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m sae_dist.train experiment=demo "$@"
