#!/usr/bin/env bash
# The unit tier on the lowest release of every dependency pyproject.toml allows, together
# (uv's `--resolution lowest-direct`), in .venv-lowest: checks that the lower bounds are
# true. torch stays at the pinned CPU build. Not part of scripts/test.sh (it installs a
# second environment); run it after changing a lower bound. Extra arguments go to pytest
# (default: tests/unit).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TORCH_PIN=$(sed -n 's/^TORCH_PIN="\([^"]*\)".*/\1/p' scripts/bootstrap.sh)
SMOLLM_PIN=$(sed -n 's/^SMOLLM_PIN="\([^"]*\)".*/\1/p' scripts/bootstrap.sh)
PY=${PYTHON:-python3.11}
[ -x .venv-lowest/bin/python ] || "$PY" -m venv .venv-lowest
.venv-lowest/bin/python -m pip install --quiet --upgrade pip uv
.venv-lowest/bin/python -m pip install --quiet "$TORCH_PIN"  # pip's own index and wheels
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_PIN" > "$constraints"
.venv-lowest/bin/uv pip install --quiet --python .venv-lowest/bin/python \
    --resolution lowest-direct -c "$constraints" -e ".[dev]"
.venv-lowest/bin/python -m pip install --quiet --no-deps "$SMOLLM_PIN"
.venv-lowest/bin/uv pip list --python .venv-lowest/bin/python 2>/dev/null \
    | grep -E -i '^(transformers|accelerate|peft|torchao|typer|rich|numpy|pydantic) '
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv-lowest/bin/python -m pytest -p no:cacheprovider "${@:-tests/unit}"
