#!/usr/bin/env bash
# The unit tier under another Python than CI's 3.11 (pyproject.toml allows >= 3.10), in
# .venv-<version>: `bash scripts/test-python.sh python3.12 [pytest arguments]` (default:
# tests/unit). Not part of scripts/test.sh (it installs a second environment). The torch
# pin's CPU build on this machine is for Python 3.11 only: for another Python, pip takes
# PyPI's build of the same version (with its CUDA libraries, several GB; it runs on CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${1:?give a Python to test under, e.g. python3.12 or /path/to/python3.13}
shift
version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
TORCH_PIN=$(sed -n 's/^TORCH_PIN="\([^"]*\)".*/\1/p' scripts/bootstrap.sh)
SMOLLM_PIN=$(sed -n 's/^SMOLLM_PIN="\([^"]*\)".*/\1/p' scripts/bootstrap.sh)
venv=".venv-$version"
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$TORCH_PIN"
"$venv/bin/python" -m pip install --quiet -e ".[dev]"
"$venv/bin/python" -m pip install --quiet --no-deps "$SMOLLM_PIN"
"$venv/bin/python" -c 'import sys, torch, transformers; print("Python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$venv/bin/python" -m pytest -p no:cacheprovider "${@:-tests/unit}"
