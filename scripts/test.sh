#!/usr/bin/env bash
# The test command: installs everything into .venv on a fresh machine, lints and type-checks
# (ruff and mypy, configured in pyproject.toml), then runs pytest. Any finding stops it there.
# Extra arguments go to pytest (e.g. bash scripts/test.sh -m "not kafka").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh test
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
