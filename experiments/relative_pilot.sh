# Issue 39's pilot (docs/durability.md, "A perturbation sized by each layer's own scale"): Vaccine with the
# relative norm at rho 0.01 and 0.03, seed 42, in the replication regime; per candidate stage 1, the p = 0
# fine-tune (the pilot's rule reads its held-out alignment loss and SST2), then stage 2 at lr 4e-3 x 4 epochs and
# the replication's lr 1e-3 x 2. Two single-thread processes side by side, one per candidate; resumable (finished
# phases are skipped, training resumes from its last checkpoint). Run it from a worktree pinned at a commit.
#   bash experiments/relative_pilot.sh [--rhos 0.01,0.03] [extra sweep flags]
set -euo pipefail
OUT=outputs/relative
RHOS=0.01,0.03
if [ "${1:-}" = "--rhos" ]; then RHOS=$2; shift 2; fi
mkdir -p "$OUT/logs"
source experiments/grid_env.sh outputs/base_model
pids=()
for rho in ${RHOS//,/ }; do
  HF_DATASETS_CACHE="$OUT/datasets_cache/rho$rho" python -m vaccine_trainer sweep --config experiments/replication.yaml \
    --output_dir "$OUT" --model_name_or_path "$MODEL" --methods vaccine --vaccine_norm relative --rho "$rho" \
    --seeds 42 --harmful_ratios 0.1 --attacks 4e-3x4,1e-3x2 --workers 1 "$@" >> "$OUT/logs/rho$rho.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
