#!/usr/bin/env bash
# Runs the test suite (and lint) in the project's virtual environment, creating it on first use.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
ruff check .
python -m pytest -q --durations=15 "$@"   # the 15 slowest tests are listed: the suite has a ~5-minute budget
