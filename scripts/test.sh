#!/usr/bin/env bash
# Quick start: install what is missing, then run lint and the whole test suite (as root the
# real-kernel eBPF and network-namespace tests run too; otherwise they are skipped with the reason).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
VENV=${PCIETAX_VENV:-.venv}
"$VENV/bin/python" -m ruff check .
exec "$VENV/bin/python" -m pytest "$@"
