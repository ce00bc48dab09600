#!/usr/bin/env bash
# The diffusekit-vs-reference comparison (benchmarks/compare.py) on a CUDA machine, in float32, float16 and
# bfloat16, W1-W8 at full size, with the table written to a file. Without a GPU it runs the same script on the CPU
# in float32 (--tiny unless FULL=1), so the path is exercised everywhere.
#
#   bash benchmarks/gpu.sh [OUT_DIR] [compare.py options...]   # default OUT_DIR: benchmarks/results
#   QUICK=1 bash benchmarks/gpu.sh                             # W1, W2, W6 only
#   PYTHON=python3 bash benchmarks/gpu.sh /tmp/out --pipeline fixture_copy --allow-busy
#
# Each workload runs in its own process (a failure in one is reported and the others still run), then the
# partial reports are merged into one JSON and one table: compare-<kind>-<stamp>.{json,txt}, and the log of every
# run in compare-<kind>-<stamp>.log.
# Needs the reference: pip install -e '.[bench]' (on an offline GPU machine, carry the wheels over).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
OUT=${1:-benchmarks/results}
shift || true
mkdir -p "$OUT"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
args=(--reps "${REPS:-5}" --budget-seconds "${BUDGET:-120}" "$@")
workloads=(W1 W2 W3 W4 W5 W6 W7 W8)
[ "${QUICK:-0}" = 1 ] && workloads=(W1 W2 W6)

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  kind=cuda
  args+=(--device cuda --dtypes float32 float16 bfloat16)
else
  kind=cpu
  echo "gpu.sh: no CUDA device; running the CPU fallback (float32$([ "${FULL:-0}" = 1 ] || echo ', tiny models'))" >&2
  args+=(--device cpu --dtypes float32)
  [ "${FULL:-0}" = 1 ] || args+=(--tiny)
fi
base="$OUT/compare-$kind-$stamp"
# PARTS_DIR keeps the per-workload reports (e.g. where a time limit may stop the run before the merge)
if [ -n "${PARTS_DIR:-}" ]; then parts=$PARTS_DIR; mkdir -p "$parts"; else parts=$(mktemp -d); trap 'rm -rf "$parts"' EXIT; fi
reports=()
for w in "${workloads[@]}"; do
  echo "gpu.sh: $w" >&2
  # W8 (1000 DDPM steps per image) gets one run per side and dtype unless BUDGET_W8 allows more
  extra=(); [ "$w" = W8 ] && extra=(--budget-seconds "${BUDGET_W8:-30}")
  if "$PYTHON" benchmarks/compare.py "${args[@]}" "${extra[@]}" --workloads "$w" --json "$parts/$w.json" >>"$base.log" 2>&1; then
    reports+=("$parts/$w.json")
  else
    echo "gpu.sh: $w failed (rc $?); see $base.log" >&2
  fi
done
[ ${#reports[@]} -gt 0 ] || { echo "gpu.sh: every workload failed; see $base.log" >&2; exit 1; }
merge=(--merge "${reports[@]}" --json "$base.json")
for a in "$@"; do [ "$a" = --allow-busy ] && merge+=(--allow-busy); done
"$PYTHON" benchmarks/compare.py "${merge[@]}" | tee "$base.txt"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' >> "$base.txt"
echo "gpu.sh: table written to $base.txt" >&2
