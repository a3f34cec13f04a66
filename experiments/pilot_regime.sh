#!/usr/bin/env bash
# Issue 14's regime pilots (experiments/pilot_regime.yaml), from the repository root:
#   bash experiments/pilot_regime.sh [extra grid flags, e.g. --finetune_learning_rate 5e-4 --output_dir ...]
# One process per method (non-aligned, sft), one torch thread each; resumable; then the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=experiments/pilot_regime.yaml
OUT=$(python -c "import yaml,sys; print(yaml.safe_load(open('$CONFIG'))['output_dir'])")
for arg in "$@"; do if [ "${prev:-}" = "--output_dir" ]; then OUT=$arg; fi; prev=$arg; done
mkdir -p "$OUT/logs"
source experiments/grid_env.sh outputs/base_model
grid --methods sft "$@" > "$OUT/logs/sft.log" 2>&1 & sft=$!
grid --methods non-aligned "$@" > "$OUT/logs/non-aligned.log" 2>&1 & plain=$!
wait "$sft"; wait "$plain"
grid --methods non-aligned,sft "$@" > "$OUT/logs/summary.log" 2>&1
echo "summary: $OUT/summary/summary.md"
