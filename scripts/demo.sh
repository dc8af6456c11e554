#!/usr/bin/env bash
# The demo: installs what it needs into .venv, builds an artifact (placeholder weights unless
# models/ holds the real ones), starts an embedded Kafka-protocol broker, publishes real
# photos, runs the service, prints the labels and metrics, and stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[demo]'
exec .venv/bin/python -m stream.demo "$@"
