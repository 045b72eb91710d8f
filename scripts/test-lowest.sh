#!/usr/bin/env bash
# The unit tier on the lowest release of every dependency pyproject.toml allows, in
# .venv-lowest (Python: $PYTHON, default python3.11); extra arguments go to pytest
# (default: tests/unit). The same as `scripts/test-python.sh --lowest`, which says more.
exec bash "$(dirname "${BASH_SOURCE[0]}")/test-python.sh" --lowest "${PYTHON:-python3.11}" "$@"
