"""Host memory of stage 2's drift measure: the cached reference (before) against the reference recomputed with
the adapter disabled (now), at two model sizes and two row counts.

Each (model, rows, mode) runs in a fresh process: a Llama with LoRA (random weights, nonzero adapter) is built,
the peak resident set is reset (`/proc/self/clear_refs`), then `cache_reference` and one `measure` run, and the
peak over them minus the resident set before is what the drift measure costs the host. The drift values of both
modes are printed side by side: they must be equal.

    python bench/drift_memory.py --json bench/results/drift-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = {"hidden512-layers8": (512, 8), "hidden1024-layers16": (1024, 16)}
ROWS = (32, 128)
SEQ_LEN = 128


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(model_name: str, rows: int, mode: str) -> dict:
    import peft
    import torch
    import transformers

    from vaccine_trainer import AlignmentDriftCallback

    torch.set_num_threads(1)
    hidden, layers = MODELS[model_name]
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=SEQ_LEN, use_cache=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 1000, (SEQ_LEN,), generator=generator).tolist()} for _ in range(rows)]
    callback = AlignmentDriftCallback(data, batch_size=8, reference_without_adapter=mode == "recomputed")
    Path("/proc/self/clear_refs").write_text("5")
    before = _kib("VmRSS")
    if mode == "cached":  # what stage 2 did before: h_aligned of the base (adapter disabled) kept on the host
        with model.disable_adapter():
            callback.reference_without_adapter = False
            callback.cache_reference(model)
    else:
        callback.cache_reference(model)
    values = callback.measure(model)
    return {"host_peak_added_mib": (_kib("VmHWM") - before) / 1024, "values": values}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        model_name, rows, mode = args.worker
        print(json.dumps(worker(model_name, int(rows), mode)))
        return
    started, results = time.time(), []
    for model_name in MODELS:
        for rows in ROWS:
            row = {"model": model_name, "rows": rows, "seq_len": SEQ_LEN}
            for mode in ("cached", "recomputed"):
                out = subprocess.run([sys.executable, __file__, "--worker", model_name, str(rows), mode],
                                     check=True, capture_output=True, text=True).stdout
                row[mode] = json.loads(out.strip().splitlines()[-1])
            hidden, layers = MODELS[model_name]
            row["cache_size_mib"] = rows * SEQ_LEN * layers * hidden * 4 / 2**20  # fp32 reference, as cached
            row["values_equal"] = all(abs(row["cached"]["values"][k] - row["recomputed"]["values"][k])
                                      <= 1e-9 * max(1.0, abs(row["cached"]["values"][k]))
                                      for k in row["cached"]["values"])
            results.append(row)
            print(f"{model_name} rows {rows}: host peak added, cached {row['cached']['host_peak_added_mib']:.0f} MiB "
                  f"(the fp32 cache alone: {row['cache_size_mib']:.0f} MiB), recomputed "
                  f"{row['recomputed']['host_peak_added_mib']:.0f} MiB; values equal: {row['values_equal']}",
                  flush=True)
    summary = {"command": "python " + " ".join([os.path.relpath(__file__), *(argv or sys.argv[1:])]),
               "results": results, "wall_seconds": time.time() - started}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
