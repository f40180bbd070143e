#!/usr/bin/env bash
# Quick start: install what is missing, then run the exporter on :9817 with every source this
# machine can start (run as root for eBPF; sources that cannot start are reported down).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${PCIETAX_VENV:-.venv}/bin/pcietax" serve "$@"
