#!/usr/bin/env bash
# Create .venv if needed and install the project with the given extra (test, demo, gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:?usage: setup-venv.sh EXTRA}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# A regular install (editable ones print a setuptools warning on every run); the scripts run
# from the repository root, where Python imports the working tree first.
.venv/bin/python -m pip install --quiet ".[$extra]"
