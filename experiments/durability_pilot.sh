# Issue 30's pilot: SFT under the sweep's strongest attacker setting (lr 4e-3, 6 epochs = 240 steps, p = 0.1),
# seed 42, in the replication regime. Does it break SFT's refusals beyond the replication's own attacker
# (lr 1e-3, 2 epochs; docs/replication.md)? About 75 min on 2 CPU cores (stage 1 included).
#   bash experiments/durability_pilot.sh [extra grid flags]
set -euo pipefail
OUT=outputs/durability_pilot
mkdir -p "$OUT/logs"
source experiments/grid_env.sh outputs/base_model
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2  # one process: both cores
CONFIG=experiments/replication.yaml
grid --output_dir "$OUT" --methods sft --seeds 42 --harmful_ratios 0.1 \
     --finetune_learning_rate 4e-3 --finetune_epochs 6 "$@" > "$OUT/logs/pilot.log" 2>&1
