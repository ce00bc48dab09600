#!/usr/bin/env bash
# Runs the test suite (and lint) in the project's virtual environment, creating it on first use.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
ruff check .
python -m pytest -q "$@"
