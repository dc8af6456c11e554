#!/usr/bin/env bash
# The test command: installs everything into .venv on a fresh machine, then runs pytest.
# Extra arguments go to pytest (e.g. bash scripts/test.sh -m "not kafka").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
exec .venv/bin/python -m pytest "$@"
