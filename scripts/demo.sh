#!/usr/bin/env bash
# The demo: installs what it needs into .venv, builds an artifact (placeholder weights unless
# models/ holds the real ones: python -m engine_build fetch-weights), starts an embedded
# Kafka-protocol broker, publishes real photos, runs the service, prints the labels and metrics,
# and stops everything it started. Extra arguments go to python -m stream.demo (e.g. --models DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "demo: step 1 of 2: installing into .venv (scripts/setup-venv.sh demo)"
bash scripts/setup-venv.sh demo
echo "demo: step 2 of 2: the demo (python -m stream.demo): artifact, broker, photos in, labels out"
exec .venv/bin/python -m stream.demo "$@"
