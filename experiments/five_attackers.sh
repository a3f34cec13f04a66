# Issue 39's five-attacker runs (docs/durability.md, "Five attackers"): the replication regime at p = 0.1 under
# lr 1e-3 x 2 (the replication's attacker) and lr {2e-3, 4e-3} x {4, 6} epochs, judged on all 500 harmful prompts.
# One single-thread process per call; run two calls side by side on two cores, from a worktree pinned at a commit.
# Resumable (finished phases are skipped, training resumes from its last checkpoint).
#   bash experiments/five_attackers.sh --methods sft,vaccine --seeds 42
#   bash experiments/five_attackers.sh --methods vaccine --vaccine_norm relative --rho 0.003 --seeds 42
# Then every table from the verdict files alone:
#   python experiments/sweep_from_verdicts.py OUT outputs/five_attackers/sweep_summary/verdicts/*.json
set -euo pipefail
OUT=outputs/five_attackers
mkdir -p "$OUT/logs"
source experiments/grid_env.sh outputs/base_model
tag=$(echo "$*" | tr -c 'A-Za-z0-9.,_-' '_' | tr -s '_' | sed 's/^[-_]*//')
HF_DATASETS_CACHE="$OUT/datasets_cache/$tag" exec python -m vaccine_trainer sweep --config experiments/replication.yaml \
  --output_dir "$OUT" --model_name_or_path "$MODEL" --harmful_ratios 0.1 --num_prompts 500 \
  --attacks 1e-3x2,2e-3x4,2e-3x6,4e-3x4,4e-3x6 --workers 1 "$@" >> "$OUT/logs/$tag.log" 2>&1
