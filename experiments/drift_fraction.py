"""Final drift of each arm of a grid cell, absolute, as a fraction of the aligned model's hidden-state
energy and for the median token, recomputed from the saved adapters for cells fine-tuned before
`alignment/drift_fraction` and `alignment/median_token_drift` were logged.

    python experiments/drift_fraction.py outputs/replication/seed42/p0.1 [more cells] [--force]

Each arm's figures are saved in its stage-2 folder (`alignment_drift_recomputed.json`); an arm with that file is
read back, not recomputed, unless --force. The grid's summary with the recomputed figures where an arm's log lacks
them (`vaccine-trainer grid` reads logs only):

    python experiments/drift_fraction.py --summary outputs/replication --seeds 42,43 --ratios 0,0.1,0.2

Drift is a sum of squared distances to each arm's own aligned model, so an arm whose aligned hidden states
are larger drifts more in absolute terms for the same relative change. The fraction divides by
sum ||h_aligned||^2 over the same layers and tokens. The recomputed absolute drift is printed beside the
logged one as a check that the same rows, layers and weights were used.

Both sums are dominated by the few tokens with massive activations (SmolLM2's first positions carry
hidden states orders of magnitude larger than the rest), so the median over tokens and layers of
||h - h_aligned||^2 / ||h_aligned||^2 is printed too: how far a typical token's hidden state moved. So is
the drift summed over every token but each row's first: in a causal model the first token's hidden state is
the same for every row that opens with it (the chat template's `<|im_start|>`), and it carries the largest
activations.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from datasets import Dataset
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from vaccine_trainer.callbacks import (
    DRIFT_EXCLUDING_FIRST_TOKEN_KEY,
    DRIFT_FRACTION_KEY,
    DRIFT_KEY,
    MEDIAN_TOKEN_DRIFT_KEY,
)
from vaccine_trainer.commands.common import load_tokenizer
from vaccine_harness.commands.grid import SUMMARY_DIR, cell_dir, collect_rows, evaluated_arms, write_summary
from vaccine_trainer.data import build_alignment_dataset
from vaccine_trainer.sft import AlignedSFTConfig, AlignedSFTTrainer


RECOMPUTED_DRIFT_FILE = "alignment_drift_recomputed.json"


def arm_drift(finetune: Path) -> dict[str, float]:
    """Rebuild stage 2's drift rows and trainer as the finetune phase did, load its adapter, measure."""
    settings = json.loads((finetune / "phase.json").read_text())["settings"]
    tokenizer = load_tokenizer(settings["model_name_or_path"])
    rows = build_alignment_dataset(settings["drift_dataset"], settings["drift_samples"],
                                   seed=settings["dataset_seed"], template=settings["template"],
                                   tokenizer=tokenizer, held_out=True)
    with tempfile.TemporaryDirectory() as scratch:
        args = AlignedSFTConfig(output_dir=scratch, max_length=settings["max_length"], report_to="none",
                                activation_checkpointing=False, bf16=False)
        trainer = AlignedSFTTrainer(settings["model_name_or_path"], args,
                                    Dataset.from_list([{"prompt": "x", "completion": "y"}]),
                                    alignment_adapter=settings.get("alignment_adapter"), alignment_dataset=rows,
                                    processing_class=tokenizer)
    callback = trainer.drift_callback
    callback.cache_reference(trainer.model)  # the adapter disabled: the aligned model
    state = load_file(str(finetune / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(trainer.model, state)
    if result.unexpected_keys:
        raise ValueError(f"{finetune}: adapter keys the stage-2 model does not have: {result.unexpected_keys[:3]}")
    logged = json.loads((finetune / "alignment_drift.json").read_text())[-1]
    return {"logged_drift": logged[DRIFT_KEY], **callback.measure(trainer.model)}


SAVED = {"drift": DRIFT_KEY, "drift_fraction": DRIFT_FRACTION_KEY, "median_token_drift": MEDIAN_TOKEN_DRIFT_KEY,
         "drift_excluding_first_token": DRIFT_EXCLUDING_FIRST_TOKEN_KEY}
"""The saved file's names (the summary's, `DRIFT_MEASURES`) and the callback's keys."""


def saved_arm_drift(finetune: Path, force: bool = False) -> dict[str, float]:
    """`arm_drift`, read from the arm's recomputed file when it has every figure, else computed and saved."""
    path = finetune / RECOMPUTED_DRIFT_FILE
    if path.is_file() and not force:
        stored = json.loads(path.read_text())
        if all(name in stored for name in SAVED):
            return {"logged_drift": stored["logged_drift"], **{key: stored[name] for name, key in SAVED.items()}}
    values = arm_drift(finetune)
    path.write_text(json.dumps({"logged_drift": values["logged_drift"],
                                **{name: values[key] for name, key in SAVED.items()}}, indent=1) + "\n")
    return values


def rows_with_recomputed_drift(root: Path, seeds: list[int], ratios: list[float]) -> tuple[list[dict], list[str]]:
    """The grid's rows, with each drift measure an arm's log lacks taken from its recomputed file; each row names
    those it took (`drift_recomputed`)."""
    rows, missing = collect_rows(root, seeds, ratios)
    folders = {(seed, ratio, label): folder for seed in seeds for ratio in ratios
               for label, folder in evaluated_arms(cell_dir(root, seed, ratio))}
    for row in rows:
        path = folders[row["seed"], row["harmful_ratio"], row["method"]] / "finetune" / RECOMPUTED_DRIFT_FILE
        stored = json.loads(path.read_text()) if path.is_file() else {}
        row["drift_recomputed"] = [name for name in SAVED if row.get(f"final_{name}") is None
                                   and stored.get(name) is not None]
        row.update({f"final_{name}": stored[name] for name in row["drift_recomputed"]})
    return rows, missing


def recomputed_note(rows: list[dict]) -> list[str]:
    recomputed = [row for row in rows if row.get("drift_recomputed")]
    if not recomputed:
        return []
    names = sorted({name.replace("_", " ") for row in recomputed for name in row["drift_recomputed"]})
    return [f"Recomputed from the saved stage-2 adapter for {len(recomputed)} arm(s) fine-tuned before these were "
            f"logged (`experiments/drift_fraction.py`): {', '.join(names)}."]


def write_summary_with_recomputed_drift(root: Path, seeds: list[int], ratios: list[float]) -> Path:
    rows, missing = rows_with_recomputed_drift(root, seeds, ratios)
    return write_summary(root / SUMMARY_DIR, rows, missing=missing, notes=recomputed_note(rows))["markdown"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="*", type=Path)
    parser.add_argument("--force", action="store_true", help="recompute arms that already have the file")
    parser.add_argument("--summary", type=Path, help="a grid's folder: write its summary with the recomputed drift")
    parser.add_argument("--seeds", default="42", help="the grid's seeds, e.g. 42,43 (with --summary)")
    parser.add_argument("--ratios", default="0,0.1,0.2", help="the grid's harmful ratios (with --summary)")
    options = parser.parse_args()
    if options.summary:
        seeds, ratios = [int(s) for s in options.seeds.split(",")], [float(p) for p in options.ratios.split(",")]
        print(write_summary_with_recomputed_drift(options.summary, seeds, ratios))
        return
    print("| cell | arm | logged drift | recomputed drift | drift fraction | median token drift "
          "| drift excluding first token |\n|---|---|---:|---:|---:|---:|---:|")
    for cell in options.cells:
        for finetune in sorted(cell.glob("*/finetune")):
            if not (finetune / "adapter_model.safetensors").is_file():
                continue
            values = saved_arm_drift(finetune, options.force)
            print(f"| {cell} | {finetune.parent.name} | {values['logged_drift']:.4g} | {values[DRIFT_KEY]:.4g} | "
                  f"{values[DRIFT_FRACTION_KEY]:.4g} | {values[MEDIAN_TOKEN_DRIFT_KEY]:.4g} | "
                  f"{values[DRIFT_EXCLUDING_FIRST_TOKEN_KEY]:.4g} |", flush=True)


if __name__ == "__main__":
    main()
