#!/usr/bin/env bash
# Issue 7's grid with one command, from the repository root:  bash experiments/replicate_small.sh
# 1. the grid of experiments/replicate_small.yaml (3 methods x p in {0, 0.1, 0.2} x seeds 42, 43),
#    one `vaccine-trainer grid` process per seed, one torch thread each (2 cores);
# 2. the rho sweep: Vaccine with rho 5 at p = 0.1 (its SFT reference is the grid's), on seeds 42 and 43;
#    SWEEP_RHOS=0.5,5 adds rho 0.5 and SWEEP_SEEDS=42 runs one seed (what fitted the session behind
#    docs/replication_issue7.md);
# 3. the summaries (every phase is done by then, so these calls only read and write reports).
# Resumable: run it again after an interruption and finished phases are skipped. Logs: $OUT/logs.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=experiments/replicate_small.yaml
OUT=outputs/replicate_small
SWEEP_RHOS=${SWEEP_RHOS:-5}
SWEEP_SEEDS=${SWEEP_SEEDS:-42 43}
mkdir -p "$OUT/logs"
source experiments/grid_env.sh "$OUT/base_model"

# 1. the main grid, one process per seed
grid --seeds 42 > "$OUT/logs/grid_seed42.log" 2>&1 & first=$!
grid --seeds 43 > "$OUT/logs/grid_seed43.log" 2>&1 & second=$!
wait "$first"; wait "$second"  # set -e: stop here if either failed (its log says why)

# 2. the rho sweep at p = 0.1, one process per seed
sweep() { grid --output_dir "$OUT/rho_sweep" --methods vaccine --harmful_ratios 0.1 --rho "$SWEEP_RHOS" "$@"; }
pids=()
for seed in $SWEEP_SEEDS; do
  sweep --seeds "$seed" > "$OUT/logs/sweep_seed$seed.log" 2>&1 & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

# 3. summaries over every seed (nothing left to run)
grid > "$OUT/logs/summary.log" 2>&1
sweep --seeds "${SWEEP_SEEDS// /,}" > "$OUT/logs/summary_sweep.log" 2>&1
echo "summaries: $OUT/summary/summary.md and $OUT/rho_sweep/summary/summary.md"
