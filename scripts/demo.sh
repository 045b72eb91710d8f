#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the end-to-end demo on the default model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/unpact demo "$@"
