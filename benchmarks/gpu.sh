#!/usr/bin/env bash
# The diffusekit-vs-reference comparison (benchmarks/compare.py) on a CUDA machine, in float16 and bfloat16, W1-W6
# at full size, with the table written to a file. Without a GPU it runs the same script on the CPU in float32
# (--tiny unless FULL=1), so the path is exercised everywhere.
#
#   bash benchmarks/gpu.sh [OUT_DIR]            # default OUT_DIR: benchmarks/results
#   QUICK=1 bash benchmarks/gpu.sh              # W1, W2, W6 only
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh
#
# Needs the reference: pip install -e '.[bench]' (on an offline GPU machine, carry the wheels over).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
args=(--reps "${REPS:-5}" --budget-seconds "${BUDGET:-120}")
[ "${QUICK:-0}" = 1 ] && args+=(--quick)

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  kind=cuda
  args+=(--device cuda --dtypes float16 bfloat16)
else
  kind=cpu
  echo "gpu.sh: no CUDA device; running the CPU fallback (float32$([ "${FULL:-0}" = 1 ] || echo ', tiny models'))" >&2
  args+=(--device cpu --dtypes float32)
  [ "${FULL:-0}" = 1 ] || args+=(--tiny)
fi
table="$OUT/compare-$kind-$stamp.txt"
"$PYTHON" benchmarks/compare.py "${args[@]}" --json "$OUT/compare-$kind-$stamp.json" | tee "$table"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' >> "$table"
echo "gpu.sh: table written to $table" >&2
