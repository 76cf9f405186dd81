#!/usr/bin/env bash
# First-hour check of a new machine (sae_dist/gpu_check.py): NCCL all-reduce across its GPUs,
# then one DDP, one ZeRO-3 and one bf16 step of the SAE trainer on the demo's shapes, each with
# time, peak memory and a numerical check, as one table; exit code 1 if a check failed. One
# process per GPU; without GPUs 2 CPU processes on gloo (ZeRO-3 skipped). Arguments go to the
# module, e.g. `bash launch/gpu_check.sh --out runs/gpu_check.json` or, for fewer SAEs,
# `bash launch/gpu_check.sh 'sites.layers=[6]'`. PYTHON picks the interpreter (default .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m sae_dist.gpu_check "$@"
