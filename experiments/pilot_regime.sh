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
JEMALLOC=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
if [ -f "$JEMALLOC" ]; then export LD_PRELOAD="$JEMALLOC"; fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
MODEL=$(python -c "from vaccine_trainer.offline import offline_model_path as p; print(p('outputs/base_model'))" | tail -n 1)
grid() { python -m vaccine_trainer grid --config "$CONFIG" --model_name_or_path "$MODEL" "$@"; }
grid --methods sft "$@" > "$OUT/logs/sft.log" 2>&1 & sft=$!
grid --methods non-aligned "$@" > "$OUT/logs/non-aligned.log" 2>&1 & plain=$!
wait "$sft"; wait "$plain"
grid --methods non-aligned,sft "$@" > "$OUT/logs/summary.log" 2>&1
echo "summary: $OUT/summary/summary.md"
