#!/usr/bin/env bash
# Set up, then run the test suite (CPU; `-m "not slow"` for the quick subset). Not `-q`: the
# header names the CPU, its bf16 support and what `auto` resolves to (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m pytest "$@"
