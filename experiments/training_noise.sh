# Issue 39's training-noise cell (docs/durability.md, "Training noise"): seed 43's SFT arm under the replication's
# attacker (p = 0.1, lr 1e-3 x 2, 500 prompts) re-run from stage 1 with one change that only moves rounding: two
# intra-op threads where the five-attacker runs had one. Run from the same pinned worktree as those runs.
#   bash experiments/training_noise.sh
# Its verdict file (the sweep's summary command on outputs/training_noise with --attacks 1e-3x2 --methods sft
# --seeds 43 --summary_only true), then against the five-attacker cell, prompt by prompt:
#   python experiments/run_to_run.py docs/durability/five_attackers/verdicts/seed43-p0.1-lr0.001-ep2-sft.json NEW
set -euo pipefail
mkdir -p outputs/training_noise/logs
OUT=outputs/training_noise THREADS=2 bash experiments/five_attackers_jobs.sh cell:43:sft:0.1:0.001:2 \
  >> outputs/training_noise/logs/sft-seed43.log 2>&1
