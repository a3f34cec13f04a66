# Sourced by the experiment scripts: the process settings and the offline model every grid run uses.
#   source experiments/grid_env.sh MODEL_DIR     (sets MODEL; defines grid, which needs CONFIG)
# Speed only: jemalloc keeps freed pages, glibc returns the big logits buffers to the OS every step.
JEMALLOC=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
if [ -f "$JEMALLOC" ]; then export LD_PRELOAD="$JEMALLOC"; fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# The last line only: DeepSpeed, when installed, prints to stdout on import.
MODEL=$(python -c "from vaccine_trainer.offline import offline_model_path as p; print(p('$1'))" | tail -n 1)
grid() { python -m vaccine_trainer grid --config "$CONFIG" --model_name_or_path "$MODEL" "$@"; }
