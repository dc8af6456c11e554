#!/usr/bin/env bash
# The test command: installs everything into .venv on a fresh machine, lints and type-checks
# (ruff and mypy, configured in pyproject.toml), then runs pytest. Any finding stops it there.
# Extra arguments go to pytest (e.g. bash scripts/test.sh -m "not kafka"). The tests run in parallel,
# in TEST_WORKERS pytest-xdist workers (default: two per core, since most tests wait on a broker or a
# service rather than compute; TEST_WORKERS=0 runs them in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh test
.venv/bin/ruff check .
.venv/bin/mypy
workers="${TEST_WORKERS:-$(( 2 * $(nproc) ))}"
exec .venv/bin/python -m pytest -n "$workers" "$@"
