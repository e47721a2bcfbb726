#!/usr/bin/env bash
# Install HistoMet into .venv and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Prometheus, promtool, the Pushgateway, kubectl and CRD schemas for the ops/
# tests; the demo does not need them, so only the test command installs them.
bash scripts/install-ops-tools.sh
exec .venv/bin/python -m pytest "$@"
