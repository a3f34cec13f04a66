#!/usr/bin/env bash
# Issue 14's replication grid (experiments/replication.yaml), from the repository root:
#   bash experiments/replication.sh [extra grid flags, e.g. --seeds 42]
# Two processes (the Vaccine arm; the SFT and non-aligned arms), one torch thread each; resumable; then
# the summary over every method. Logs in <output_dir>/logs.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-experiments/replication.yaml}
OUT=$(python -c "import yaml; print(yaml.safe_load(open('$CONFIG'))['output_dir'])")
for arg in "$@"; do if [ "${prev:-}" = "--output_dir" ]; then OUT=$arg; fi; prev=$arg; done
mkdir -p "$OUT/logs"
source experiments/grid_env.sh outputs/base_model
stamp=$(date +%Y%m%d-%H%M%S)
grid --methods vaccine "$@" > "$OUT/logs/vaccine-$stamp.log" 2>&1 & vaccine=$!
grid --methods sft,non-aligned "$@" > "$OUT/logs/sft-non-aligned-$stamp.log" 2>&1 & others=$!
wait "$vaccine"; wait "$others"
grid "$@" > "$OUT/logs/summary-$stamp.log" 2>&1
echo "summary: $OUT/summary/summary.md"
