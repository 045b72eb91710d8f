#!/usr/bin/env bash
# The test command: set up .venv if needed, then lint (ruff), type-check (mypy), check the
# import layers (import-linter) and test (pytest: tests/unit, tests/process, tests/integration).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
# The report's browser test needs Chromium (Debian's package; the test installs nothing).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "== installing chromium (for the report's browser test)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
export UNPACT_BROWSER_TEST=required
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "== ruff" && .venv/bin/ruff check src tests benchmarks
echo "== mypy" && .venv/bin/mypy
echo "== import-linter" && .venv/bin/lint-imports
# --durations: the slowest tests, in every log (CI keeps the suite under 25 minutes)
echo "== pytest" && exec .venv/bin/pytest --durations=20 "$@"
