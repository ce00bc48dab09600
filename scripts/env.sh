#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs diffusekit into it.
# Sourced by scripts/main.sh and scripts/test.sh. CPU-only torch is pinned through constraints.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DIFFUSEKIT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${DIFFUSEKIT_EXTRAS:-dev}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.diffusekit-installed-$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || [ "$ROOT/constraints.txt" -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
