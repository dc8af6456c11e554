#!/usr/bin/env bash
# The test command: installs everything into .venv on a fresh machine, then runs pytest.
# Extra arguments go to pytest (e.g. bash scripts/test.sh -m "not kafka").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh test
exec .venv/bin/python -m pytest "$@"
