#!/usr/bin/env bash
# Issue 14's replication grid (experiments/replication.yaml), from the repository root:
#   bash experiments/replication.sh [extra grid flags, e.g. --seeds 42]
# Two processes, one torch thread each, resumable; logs in <output_dir>/logs.
#   1. the Vaccine arm (rho 2) | the SFT and non-aligned arms, at every p;
#   2. at p = 0.1 only: the rho sweep (0.5 and 5, labelled "vaccine rho=0.5" ...) | T-Vaccine (issue 16);
#   3. the summary over every arm evaluated in each cell.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-experiments/replication.yaml}
SWEEP_RHOS=${SWEEP_RHOS:-0.5,5}
OUT=$(python -c "import yaml; print(yaml.safe_load(open('$CONFIG'))['output_dir'])")
for arg in "$@"; do if [ "${prev:-}" = "--output_dir" ]; then OUT=$arg; fi; prev=$arg; done
mkdir -p "$OUT/logs"
source experiments/grid_env.sh outputs/base_model
stamp=$(date +%Y%m%d-%H%M%S)
pair() {  # pair NAME1 "FLAGS1" NAME2 "FLAGS2" [extra flags]: two grid calls side by side; fails if either fails
  grid $2 "${@:5}" > "$OUT/logs/$1-$stamp.log" 2>&1 & first=$!
  grid $4 "${@:5}" > "$OUT/logs/$3-$stamp.log" 2>&1 & second=$!
  wait "$first"; wait "$second"
}
pair vaccine "--methods vaccine" sft-non-aligned "--methods sft,non-aligned" "$@"
pair rho-sweep "--methods vaccine --rho $SWEEP_RHOS --harmful_ratios 0.1" \
     t-vaccine "--methods t-vaccine --harmful_ratios 0.1" "$@"
grid --summary_only true "$@" > "$OUT/logs/summary-$stamp.log" 2>&1
echo "summary: $OUT/summary/summary.md"
