#!/usr/bin/env bash
# Run the whole test suite (sets up first if needed). Exit code 5 (no tests collected) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
