# Named jobs of issue 39's five-attacker sweep, one after another in this process (single thread, as
# experiments/five_attackers.sh): for redoing a few cells on a machine that lost the others' outputs, where the
# sweep itself would first redo each seed's p = 0 references. Each cell job runs its arm's stage 1 first if needed.
#   bash experiments/five_attackers_jobs.sh cell:43:sft:0.1:0.004:6 cell:43:sft:0.1:0.001:2
#   bash experiments/five_attackers_jobs.sh cell:43:vaccine:0.1:0.004:6
# Job names are `vaccine-trainer sweep --workers N`'s: cell:SEED:METHOD:P:LR:EPOCHS, reference:SEED:METHOD,
# align:SEED:METHOD. Verdict files afterwards: five_attackers.sh's summary command with --summary_only true.
# OUT (default outputs/five_attackers) and THREADS (intra-op threads, default 1) for experiments/training_noise.sh.
set -euo pipefail
OUT=${OUT:-outputs/five_attackers}
mkdir -p "$OUT/logs" "$OUT/jobs"
source experiments/grid_env.sh outputs/base_model
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
# The package of this tree that holds the sweep: vaccine_harness since the library/harness split, vaccine_trainer
# before it (a worktree pinned before the split runs with PYTHONPATH=src).
PACKAGE=$([ -d src/vaccine_harness ] && echo vaccine_harness || echo vaccine_trainer)
ARGS="$OUT/jobs/sweep_arguments.json"
# The arguments file the sweep writes for its workers, from five_attackers.sh's own settings.
python - "$MODEL" "$PACKAGE" "$ARGS" "$OUT" <<'EOF'
import json, sys
from dataclasses import asdict
from importlib import import_module
from pathlib import Path
from trl import TrlParser
model, package, arguments_file, output_dir = sys.argv[1:]
sweep = import_module(f"{package}.commands.sweep")
argv = ["--config", "experiments/replication.yaml", "--output_dir", output_dir,
        "--model_name_or_path", model, "--harmful_ratios", "0.1", "--num_prompts", "500",
        "--attacks", "1e-3x2,2e-3x4,2e-3x6,4e-3x4,4e-3x6", "--methods", "sft,vaccine", "--seeds", "42,43"]
args, settings = TrlParser((sweep.PipelineArguments, sweep.SweepArguments)).parse_args_and_config(argv)
Path(arguments_file).write_text(json.dumps({"pipeline": asdict(args), "sweep": asdict(settings)}, indent=1) + "\n")
EOF
for job in "$@"; do
  echo "=== $(date -u +%FT%TZ) start $job"
  HF_DATASETS_CACHE="$OUT/datasets_cache/${job//:/_}" python -m "$PACKAGE.commands.sweep_worker" "$ARGS" "$job"
  echo "=== $(date -u +%FT%TZ) end $job"
done
