# Issue 39's training-noise cell (docs/durability.md, "Training noise"): seed 42's SFT arm under the replication's
# attacker (p = 0.1, lr 1e-3 x 2, 500 prompts) re-run from stage 1 with one change that only moves rounding: two
# intra-op threads where the five-attacker runs had one. Run from the same pinned worktree as those runs; resumable.
#   bash experiments/training_noise.sh
# Compare with outputs/five_attackers' seed 42 cell, prompt by prompt:
#   python experiments/sweep_from_verdicts.py OUT outputs/five_attackers/sweep_summary/verdicts/*.json
set -euo pipefail
OUT=outputs/training_noise
mkdir -p "$OUT/logs"
source experiments/grid_env.sh outputs/base_model
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2  # the one change
HF_DATASETS_CACHE="$OUT/datasets_cache" exec python -m vaccine_trainer sweep --config experiments/replication.yaml \
  --output_dir "$OUT" --model_name_or_path "$MODEL" --harmful_ratios 0.1 --num_prompts 500 \
  --attacks 1e-3x2 --methods sft --seeds 42 --workers 1 "$@" >> "$OUT/logs/sft-seed42.log" 2>&1
