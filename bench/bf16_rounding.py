"""How much of Vaccine's perturbation survives bf16 rounding on a real model (SmolLM2-135M-Instruct, offline).

Adding eps to a bf16 hidden state e rounds (e + eps) to bf16: where |eps| is small against |e|, part or all of it
is rounded away. This runs a few real Vaccine steps on alignment rows (`../shared/data/alignment_refusals.jsonl`)
and reads, per hooked layer, the norm of what the hooks really added (`(e + eps) - e` after rounding, the
figure `vaccine/perturbation_norm` logs summed over layers) against the norm of the eps they were given, and
the RMS of the hidden states it was added to, and where the perturbation lands: each layer's relative size
‖eps_l‖ / ‖h_l‖. Two set-ups users run: fp32 weights with bf16 autocast (`bf16=True`), and weights loaded in bf16
(`dtype=torch.bfloat16`); fp32 as the control (nothing lost). Each norm given as NORM:RHO (the paper's global
norm at rho 2, the relative norm at the pilot's rho 0.03 and 0.01 by default).

    python bench/bf16_rounding.py --json bench/results/bf16-rounding.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alignment_refusals.jsonl"


def rows(tokenizer, count: int, max_length: int) -> list[dict]:
    """Chat-formatted alignment rows, the loss on every token, cut to `max_length` (equal lengths, no padding)."""
    out = []
    with open(DATA) as handle:
        for line in handle:
            item = json.loads(line)
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": item["instruction"]}, {"role": "assistant", "content": item["output"]}],
                tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= max_length:
                ids = ids[:max_length]
                out.append({"input_ids": ids, "attention_mask": [1] * max_length, "labels": list(ids)})
            if len(out) == count:
                return out
    raise SystemExit(f"fewer than {count} rows of {max_length} tokens in {DATA}")


def measure(setup: str, norm: str, rho: float, train_rows: list[dict], steps: int, output_dir: str) -> dict:
    import peft

    import vaccine_trainer.trainer as trainer_module
    from vaccine_trainer import VaccineTrainer, VaccineTrainingArguments
    from vaccine_harness.offline import load_offline_model

    model, _ = load_offline_model(dtype=torch.bfloat16 if setup == "bf16 weights" else torch.float32)
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=4, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    args = VaccineTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=5, max_steps=steps, learning_rate=1e-4,
        lr_scheduler_type="constant", report_to="none", save_strategy="no", use_cpu=True, logging_steps=1,
        disable_tqdm=True, bf16=setup == "bf16 autocast", rho=rho, vaccine_norm=norm, seed=0)
    trainer = VaccineTrainer(model=model, args=args, train_dataset=train_rows)
    hooks = trainer.vaccine_hooks
    intended, applied, rms, size = [], [], [], []

    original_build = trainer_module.build_perturbation

    def recording_build(gradients, *a, **k):
        result = original_build(gradients, *a, **k)
        intended.append([None if e is None else torch.linalg.vector_norm(e, dtype=torch.float32).item()
                         for e in result.eps])
        return result

    original_norm = hooks.applied_norm

    def recording_norm():
        applied.append([None if sq is None else math.sqrt(sq.item()) for sq in hooks.applied])
        return original_norm()

    def record_rms(module, inputs, output):
        if hooks.mode == hooks.CAPTURE:
            hidden = output[0] if isinstance(output, tuple) else output
            rms.append(hidden.detach().float().pow(2).mean().sqrt().item())
            size.append(torch.linalg.vector_norm(hidden.detach(), dtype=torch.float32).item())

    trainer_module.build_perturbation = recording_build
    hooks.applied_norm = recording_norm
    handles = [module.register_forward_hook(record_rms) for module in hooks.modules]
    try:
        trainer.train()
    finally:
        trainer_module.build_perturbation = original_build
        for handle in handles:
            handle.remove()
    layers = len(hooks.modules)
    kept = [[a / i for a, i in zip(step_applied, step_intended) if i] for step_applied, step_intended
            in zip(applied, intended)]
    per_layer_kept = [sum(step[layer] for step in kept) / len(kept) for layer in range(layers)]
    per_layer_rms = [sum(rms[s * layers + layer] for s in range(len(kept))) / len(kept) for layer in range(layers)]
    per_layer_relative = [sum(step[layer] / size[s * layers + layer] for s, step in enumerate(intended)) / len(intended)
                          for layer in range(layers)]
    logged = [e["vaccine/perturbation_norm"] for e in trainer.state.log_history if "vaccine/perturbation_norm" in e]
    logged_kept = [e["vaccine/perturbation_kept"] for e in trainer.state.log_history if "vaccine/perturbation_kept" in e]
    attention_dtype = "bfloat16" if setup != "fp32" else "float32"
    return {
        "setup": setup, "norm": norm, "rho": rho, "steps": len(kept), "hidden_dtype": attention_dtype,
        "logged_perturbation_norm": logged,
        "kept_fraction_of_rho": sum(logged) / len(logged) / rho if norm == "global" else None,
        "logged_perturbation_kept": logged_kept,
        "per_layer_kept_fraction": per_layer_kept,
        "per_layer_hidden_rms": per_layer_rms,
        "per_layer_intended_norm": [sum(step[layer] for step in intended) / len(intended) for layer in range(layers)],
        "per_layer_relative_size": per_layer_relative,  # ||eps_l|| / ||h_l||, mean over steps
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norms", nargs="+", default=["global:2", "relative:0.03", "relative:0.01"],
                        help="NORM:RHO pairs")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--json", default=None)
    parser.add_argument("--output-dir", default="/tmp/vaccine-bench-bf16")
    args = parser.parse_args(argv)
    if not DATA.is_file():
        raise SystemExit(f"{DATA} is not present: this benchmark reads the shared alignment data")
    torch.set_num_threads(1)
    from vaccine_harness.offline import load_offline_model

    _, tokenizer = load_offline_model()
    train_rows = rows(tokenizer, 5 * args.steps, args.max_length)
    started = time.time()
    results = {"command": "python " + " ".join([os.path.relpath(__file__), *(argv or sys.argv[1:])]), "runs": []}
    for pair in args.norms:
        norm, rho = pair.split(":")
        for setup in ("fp32", "bf16 autocast", "bf16 weights"):
            run = measure(setup, norm, float(rho), train_rows, args.steps, args.output_dir)
            results["runs"].append(run)
            kept, relative = run["per_layer_kept_fraction"], run["per_layer_relative_size"]
            print(f"{norm} rho {rho}, {setup}: per layer kept {min(kept):.3f}-{max(kept):.3f}, logged median layer "
                  f"kept {statistics.mean(run['logged_perturbation_kept']):.3f}; relative size "
                  f"layer 0 {relative[0]:.2e}, median {statistics.median(relative):.2e}, "
                  f"min {min(relative):.2e}", flush=True)
    results["wall_seconds"] = time.time() - started
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
