#!/usr/bin/env bash
# The demo: installs what it needs into .venv, builds an artifact (placeholder weights unless
# models/ holds the real ones), starts an embedded Kafka-protocol broker, publishes real
# photos, runs the service, prints the labels and metrics, and stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh demo
exec .venv/bin/python -m stream.demo "$@"
