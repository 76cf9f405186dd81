#!/usr/bin/env bash
# Set up, check, then run the test suite (CPU): ruff lint, ruff format, pyright, then pytest
# (`-m "not slow"` for the quick subset; extra arguments go to pytest). Not `-q`: the header names
# the CPU, its bf16 support and what `auto` resolves to (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
echo "== ruff check"; .venv/bin/ruff check .
echo "== ruff format --check"; .venv/bin/ruff format --check .
echo "== pyright"; .venv/bin/pyright
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
