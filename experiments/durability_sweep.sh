# Issue 30's sweep in the replication regime (experiments/replication.yaml): SFT and Vaccine (rho 2), p = 0.1,
# stage 2 at lr {5e-4, 1e-3, 2e-3, 4e-3} x {2, 4, 6} epochs, each arm's p = 0 reference for the guard.
# Settings are listed strongest first, so a sweep cut short has its strongest cells. Resumable: cells, phases and
# training checkpoints (every 20 steps) already on disk are skipped or resumed. On 2 CPU cores: 2 jobs of one
# thread; on one GPU: --workers 12 (the 135M model leaves it mostly idle).
#   bash experiments/durability_sweep.sh [--seeds 42,43] [--workers N]
# The summary (outputs/durability/sweep_summary) is written at the end, and by `--summary_only true` at any time.
set -euo pipefail
OUT=outputs/durability
mkdir -p "$OUT/logs"
source experiments/grid_env.sh outputs/base_model
python -m vaccine_trainer sweep --config experiments/replication.yaml --output_dir "$OUT" \
  --model_name_or_path "$MODEL" --methods sft,vaccine --seeds 42 --harmful_ratios 0.1 \
  --learning_rates 4e-3,2e-3,1e-3,5e-4 --epochs 6,4,2 --workers 2 "$@" >> "$OUT/logs/sweep.log" 2>&1
