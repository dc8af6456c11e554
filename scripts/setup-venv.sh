#!/usr/bin/env bash
# Create .venv if needed and install the project with the given extra (test, demo, gpu), saying what
# each step does and how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:?usage: setup-venv.sh EXTRA}"
say() { echo "setup-venv: $*"; }
started=$SECONDS
if [ ! -x .venv/bin/python ]; then
    say "creating the virtual environment .venv ($(python3 --version))"
    python3 -m venv .venv
    first=1
else
    say "using the existing .venv"
    first=0
fi
say "upgrading pip"
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "$first" = 1 ]; then
    say "installing the project with its [$extra] extra: numpy, ONNX Runtime, OpenVINO, NNCF, OpenCV, Kafka clients..." \
        "(the first time about 1-2 minutes and some hundreds of MB; quiet until done)"
else
    say "installing the project with its [$extra] extra (already installed packages are kept; some seconds)"
fi
# A regular install (editable ones print a setuptools warning on every run); the scripts run
# from the repository root, where Python imports the working tree first.
.venv/bin/python -m pip install --quiet ".[$extra]"
say "done in $((SECONDS - started)) s"
