#!/usr/bin/env bash
# Create .venv if needed and install the project with the given extra (test, demo, gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:?usage: setup-venv.sh EXTRA}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$extra]"
