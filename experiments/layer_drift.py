"""Where the attack moves the model, layer by layer, beside where each perturbation pushes (issue 39).

For each stage-2 folder given: the relative drift of every hooked layer's output, ||h_l - h_l,aligned|| /
||h_l,aligned||, over the held-out alignment rows stage 2 measures its drift on (each row's first token left out:
in SmolLM2 its hidden state is the same for every row and orders of magnitude larger than the rest). With
`--perturbation RHO`, also where the paper's perturbation (global norm, rho) lands on that arm's aligned model:
||eps_l|| / ||h_l|| over the same tokens, with eps computed by the library's `build_perturbation` from the
hidden-state gradients of the rows' alignment loss, in micro-batches of 5 (stage 1's). The relative norm pushes
every token by rho of its own size, so its line is rho at every layer by construction.

    python experiments/layer_drift.py OUT.json LABEL=outputs/.../finetune [LABEL=...] [--perturbation vaccine=2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from vaccine_trainer.commands.common import load_tokenizer
from vaccine_trainer.data import build_alignment_dataset
from vaccine_trainer.layers import find_vaccine_modules
from vaccine_trainer.perturbation import HiddenStateHooks, build_perturbation, hidden_state_gradients
from vaccine_trainer.sft import AlignedSFTConfig, AlignedSFTTrainer

MICRO_BATCH = 5  # stage 1's batch: the paper's norm is taken over one micro-batch


def stage_two_trainer(finetune: Path, rows: int) -> AlignedSFTTrainer:
    """Stage 2's model (aligned base + the saved stage-2 adapter) and held-out drift rows, as the phase built them."""
    settings = json.loads((finetune / "phase.json").read_text())["settings"]
    tokenizer = load_tokenizer(settings["model_name_or_path"])
    drift_rows = build_alignment_dataset(settings["drift_dataset"], rows, seed=settings["dataset_seed"],
                                         template=settings["template"], tokenizer=tokenizer, held_out=True)
    with tempfile.TemporaryDirectory() as scratch:
        args = AlignedSFTConfig(output_dir=scratch, max_length=settings["max_length"], report_to="none",
                                activation_checkpointing=False, bf16=False, drift_batch_size=MICRO_BATCH)
        trainer = AlignedSFTTrainer(settings["model_name_or_path"], args,
                                    Dataset.from_list([{"prompt": "x", "completion": "y"}]),
                                    alignment_adapter=settings.get("alignment_adapter"),
                                    alignment_dataset=drift_rows, processing_class=tokenizer)
    result = set_peft_model_state_dict(trainer.model, load_file(str(finetune / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise ValueError(f"{finetune}: adapter keys the stage-2 model does not have: {result.unexpected_keys[:3]}")
    return trainer


def batches(trainer: AlignedSFTTrainer):
    callback = trainer.drift_callback
    for start in range(0, len(callback.rows), MICRO_BATCH):
        batch = callback.collate(callback.rows[start:start + MICRO_BATCH], trainer.model)
        mask = batch["attention_mask"].bool()
        kept = mask & (mask.cumsum(dim=1) > 1)  # valid tokens but each row's first
        yield batch, kept


def layer_outputs(model, modules, batch) -> list[torch.Tensor]:
    hooks = HiddenStateHooks(modules)
    with hooks.installed_for(), hooks.capturing():  # capturing records outputs only where grad is enabled
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return [h.detach().float() for h in hooks.outputs]


def paper_push(model, modules, batch, rho: float) -> list[torch.Tensor]:
    """The paper's eps for this micro-batch (global norm), as the trainer computes it, one tensor per layer."""
    hooks = HiddenStateHooks(modules)
    with hooks.installed_for(), hooks.capturing():  # a frozen model's first hooked output becomes a leaf
        loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, use_cache=False).loss
        gradients = hidden_state_gradients(loss, hooks)
    return [e.float() for e in build_perturbation(gradients, rho, "global").eps]


def arm_profile(finetune: Path, rows: int, rho: float | None) -> dict[str, list[float]]:
    trainer = stage_two_trainer(finetune, rows)
    model = trainer.model.eval()
    modules = [module for _, module in find_vaccine_modules(model, "attention")]
    moved = [0.0] * len(modules)
    energy = [0.0] * len(modules)
    pushed = [0.0] * len(modules)
    for batch, kept in batches(trainer):
        tuned = layer_outputs(model, modules, batch)
        with model.disable_adapter():
            aligned = layer_outputs(model, modules, batch)
            eps = paper_push(model, modules, batch, rho) if rho is not None else None
        for layer, (h, h0) in enumerate(zip(tuned, aligned)):
            moved[layer] += (h - h0)[kept].pow(2).sum().item()
            energy[layer] += h0[kept].pow(2).sum().item()
            if eps is not None:
                pushed[layer] += eps[layer][kept].pow(2).sum().item()
    profile = {"relative_drift": [(m / e) ** 0.5 for m, e in zip(moved, energy)]}
    if rho is not None:
        profile["paper_push_relative_size"] = [(p / e) ** 0.5 for p, e in zip(pushed, energy)]
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("arms", nargs="+", help="LABEL=stage-2 folder")
    parser.add_argument("--rows", type=int, default=40, help="held-out alignment rows (stage 2 logs 20)")
    parser.add_argument("--perturbation", action="append", default=[],
                        help="LABEL=RHO: also the paper's eps on that arm's aligned model")
    options = parser.parse_args()
    rhos = dict(item.split("=", 1) for item in options.perturbation)
    result = {"rows": options.rows, "first_token": "left out", "target": "attention", "arms": {}}
    for item in options.arms:
        label, folder = item.split("=", 1)
        rho = float(rhos[label]) if label in rhos else None
        result["arms"][label] = {"folder": folder, **arm_profile(Path(folder), options.rows, rho)}
        drift = result["arms"][label]["relative_drift"]
        print(f"{label}: relative drift by layer " + " ".join(f"{d:.2g}" for d in drift))
        if rho is not None:
            print(f"{label}: the paper's push (rho {rho:g}) by layer "
                  + " ".join(f"{p:.2g}" for p in result["arms"][label]["paper_push_relative_size"]))
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
