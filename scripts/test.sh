#!/usr/bin/env bash
# The test command: set up .venv if needed, then lint (ruff), type-check (mypy) and test (pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "== ruff" && .venv/bin/ruff check src tests benchmarks
echo "== mypy" && .venv/bin/mypy
echo "== pytest" && exec .venv/bin/pytest "$@"
