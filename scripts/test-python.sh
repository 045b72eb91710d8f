#!/usr/bin/env bash
# The unit tier in a second environment (not part of scripts/test.sh, which uses .venv):
#   bash scripts/test-python.sh PYTHON [pytest arguments]
#       under another Python than CI's 3.11 (pyproject.toml allows >= 3.10), in .venv-<version>;
#   bash scripts/test-python.sh --lowest [PYTHON] [pytest arguments]
#       on the lowest release of every dependency pyproject.toml allows, together (uv's
#       `--resolution lowest-direct`), in .venv-lowest (PYTHON: default python3.11; another
#       one's environment is .venv-lowest-<version>): checks the lower bounds; run it after
#       changing one.
# pytest's arguments default to tests/unit. torch stays at bootstrap.sh's pin; its CPU build
# on this machine is for Python 3.11 only: for another Python, pip takes PyPI's build of the
# same version (with its CUDA libraries, several GB; it runs on CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
lowest=false
if [ "${1:-}" = "--lowest" ]; then
    lowest=true
    shift
    PY=python3.11
    case "${1:-}" in ""|-*|tests*|*.py) ;; *) PY=$1; shift ;; esac
else
    PY=${1:?give a Python to test under, e.g. python3.12 or /path/to/python3.13 (or --lowest)}
    shift
fi
version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
TORCH_PIN=$(sed -n 's/^TORCH_PIN="\([^"]*\)".*/\1/p' scripts/bootstrap.sh)
SMOLLM_PIN=$(sed -n 's/^SMOLLM_PIN="\([^"]*\)".*/\1/p' scripts/bootstrap.sh)
if $lowest; then
    venv=.venv-lowest
    [ "$version" = 3.11 ] || venv=".venv-lowest-$version"
else
    venv=".venv-$version"
fi
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$TORCH_PIN"  # pip's own index and wheels
if $lowest; then
    "$venv/bin/python" -m pip install --quiet uv
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    echo "$TORCH_PIN" > "$constraints"
    "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" \
        --resolution lowest-direct -c "$constraints" -e ".[dev]"
else
    "$venv/bin/python" -m pip install --quiet -e ".[dev]"
fi
"$venv/bin/python" -m pip install --quiet --no-deps "$SMOLLM_PIN"
"$venv/bin/python" -m pip list 2>/dev/null \
    | grep -E -i '^(torch|transformers|accelerate|peft|torchao|typer|rich|numpy|pydantic) '
"$venv/bin/python" -c 'import sys; print("Python", sys.version.split()[0])'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$venv/bin/python" -m pytest -p no:cacheprovider "${@:-tests/unit}"
