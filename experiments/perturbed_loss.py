"""Did stage 1 buy what Vaccine trains for? Each aligned model's held-out alignment loss, clean and under
the worst-case perturbation of size rho that Vaccine's step builds (first order: rho times the normalised
gradient of the loss with respect to every attention output, one global norm per batch).

    python experiments/perturbed_loss.py outputs/replication/seed42 [--rhos 0.5,2,5] [--rows 200] [--arms a,b]

Vaccine minimises the perturbed loss during alignment, so its aligned model should lose less to the
perturbation than SFT's. If it does and its fine-tuned model still drifts as much, the robustness
bought in stage 1 is not what protects against the attack in stage 2; if it does not, stage 1 did not
converge to a robust solution. Runs each arm's stage-1 adapter merged into the base (no stage 2);
"non-aligned" is the base model itself. Rows are the held-out alignment rows (not among stage 1's).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

from vaccine_trainer.commands.common import load_tokenizer
from vaccine_harness.commands.evaluate import load_evaluated_model
from vaccine_trainer.data import build_alignment_dataset
from vaccine_harness.evaluation.likelihood import padded_completion_batch
from vaccine_trainer.layers import find_vaccine_modules
from vaccine_trainer.perturbation import HiddenStateHooks, build_perturbation, hidden_state_gradients


def tokenize_rows(model_name_or_path: str, tokenizer, rows, max_length: int) -> list[tuple[list[int], int]]:
    """(token ids, index of the first completion token) of each row, as stage 1 trained on it.

    TRL's SFTTrainer tokenizes, truncates and drops the rows (a prompt that fills max_length leaves nothing
    to score), with the same defaults as stage 1's config, so the loss here is the one stage 1 minimised.
    """
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(output_dir=scratch, max_length=max_length, report_to="none", bf16=False,
                         activation_checkpointing=False)
        prepared = SFTTrainer(model_name_or_path, args=args, train_dataset=rows,
                              processing_class=tokenizer).train_dataset
    return [(row["input_ids"], next(i for i, label in enumerate(row["labels"]) if label != -100))
            for row in prepared]


def batches(tokenized: Sequence[tuple[list[int], int]], batch_size: int, pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) batches, prompt tokens masked out of the loss."""
    for start in range(0, len(tokenized), batch_size):
        yield padded_completion_batch(tokenized[start:start + batch_size], pad_id)


def perturbed_losses(model, modules, batch_list, rhos: Sequence[float]) -> dict[float, float]:
    """Token-weighted mean loss over the batches, clean (key 0.0) and under each rho's perturbation."""
    hooks = HiddenStateHooks(modules)
    totals = dict.fromkeys([0.0, *rhos], 0.0)
    tokens = 0
    model.eval()
    with hooks.installed_for():
        for input_ids, attention, labels in batch_list:
            count = int((labels[:, 1:] != -100).sum())
            with hooks.capturing():
                loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
                gradients = hidden_state_gradients(loss, hooks)
            totals[0.0] += loss.item() * count
            for rho in rhos:
                eps = build_perturbation([g.clone() if g is not None else None for g in gradients], rho).eps
                with torch.no_grad(), hooks.perturbing(eps):
                    perturbed = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
                totals[rho] += perturbed.item() * count
            tokens += count
    return {rho: total / tokens for rho, total in totals.items()}


def aligned_arms(seed_dir: Path, names: Sequence[str] = ()) -> list[tuple[str, Path | None]]:
    """("non-aligned", None) and (arm, stage-1 folder) of every finished stage 1 of a seed, or of `names`.

    Every arm is measured on the same rows, so an arm added later can be measured alone and set beside
    the others' figures.
    """
    arms = [("non-aligned", None)]
    for marker in sorted(seed_dir.glob("*/align/phase.json")):
        arms.append((marker.parent.parent.name, marker.parent))
    if names:
        unknown = sorted(set(names) - {name for name, _ in arms})
        if unknown:
            raise SystemExit(f"{seed_dir}: no finished stage 1 for {unknown}; there are {[n for n, _ in arms]}.")
        arms = [arm for arm in arms if arm[0] in names]
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed_dir", type=Path)
    parser.add_argument("--rhos", default="0.5,2,5")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=5)
    parser.add_argument("--arms", default="", help="comma-separated arms to measure (default: every one)")
    options = parser.parse_args()
    rhos = [float(value) for value in options.rhos.split(",")]
    every_arm = aligned_arms(options.seed_dir)
    if len(every_arm) == 1:
        raise SystemExit(f"{options.seed_dir}: no finished stage 1 (*/align/phase.json).")
    arms = aligned_arms(options.seed_dir, [name for name in options.arms.split(",") if name])
    settings = json.loads((every_arm[1][1] / "phase.json").read_text())["settings"]
    tokenizer = load_tokenizer(settings["model_name_or_path"])
    rows = build_alignment_dataset(settings["dataset"], options.rows, seed=settings["dataset_seed"],
                                   template=settings["template"], tokenizer=tokenizer, held_out=True)
    tokenized = tokenize_rows(settings["model_name_or_path"], tokenizer, rows, settings["max_length"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch_list = list(batches(tokenized, options.batch_size, pad_id))  # the same batches for every arm
    print(f"{options.seed_dir}: {len(tokenized)} held-out alignment rows, batch {options.batch_size}, "
          f"perturbation on every attention output, one global norm per batch\n")
    print("| arm | clean loss | " + " | ".join(f"rho {rho:g}" for rho in rhos) + " | "
          + " | ".join(f"rise at rho {rho:g}" for rho in rhos) + " |")
    print("|---|" + "---:|" * (1 + 2 * len(rhos)))
    for name, folder in arms:
        model = load_evaluated_model(settings["model_name_or_path"], str(folder) if folder else None)
        model.float().requires_grad_(False)
        modules = [module for _, module in find_vaccine_modules(model, "attention")]
        losses = perturbed_losses(model, modules, batch_list, rhos)
        if not all(math.isfinite(value) for value in losses.values()):
            raise SystemExit(f"{name}: a non-finite loss {losses}")
        print(f"| {name} | {losses[0.0]:.3f} | " + " | ".join(f"{losses[rho]:.3f}" for rho in rhos) + " | "
              + " | ".join(f"{losses[rho] - losses[0.0]:+.3f}" for rho in rhos) + " |", flush=True)


if __name__ == "__main__":
    main()
