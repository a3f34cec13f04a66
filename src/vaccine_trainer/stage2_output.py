"""What a stage-2 output folder needs to load as the aligned-then-fine-tuned model, and loading it.

The stage-2 adapter was trained on the base *with the alignment adapter merged*; its `adapter_config.json`
names the base only (PEFT records the model it was attached to by name), and the base plus that adapter is a
model without the alignment. So the output carries the alignment adapter (`alignment_adapter/`, a LoRA: small)
and `vaccine_stage2.json`, which says how the three fit together; `load_finetuned_model` follows it, from a local
folder or a hub repository.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

RECORD = "vaccine_stage2.json"
ALIGNMENT_FOLDER = "alignment_adapter"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "vaccine_config.json")


def alignment_settings(alignment_adapter: str | os.PathLike | None) -> dict | None:
    """The Vaccine settings stage 1 saved beside its adapter (`vaccine_config.json`), if it did."""
    path = Path(alignment_adapter) / "vaccine_config.json" if alignment_adapter is not None else None
    return json.loads(path.read_text())["settings"] if path is not None and path.is_file() else None


def write_stage2_record(output_dir: str | os.PathLike, base_model: str, alignment_adapter: str | None) -> dict:
    """Copy the alignment adapter into `output_dir` and write the record `load_finetuned_model` reads."""
    output = Path(output_dir)
    record = {"base_model": base_model, "alignment_adapter": None, "stage2_adapter": ".",
              "how": "base_model + alignment_adapter merged into its weights, then stage2_adapter on top"}
    if alignment_adapter is not None:
        target = output / ALIGNMENT_FOLDER
        target.mkdir(parents=True, exist_ok=True)
        for name in _ADAPTER_FILES:
            if (Path(alignment_adapter) / name).is_file():
                shutil.copy2(Path(alignment_adapter) / name, target / name)
        record["alignment_adapter"] = ALIGNMENT_FOLDER
    (output / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def load_finetuned_model(name_or_path: str | os.PathLike, **load_kwargs: Any):
    """The aligned-then-fine-tuned model of a stage-2 output folder or hub repository, merged into plain weights.

    `load_kwargs` go to the base model's `from_pretrained` (dtype, device_map, ...).
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(name_or_path)))
    record_path = folder / RECORD
    if not record_path.is_file():
        raise FileNotFoundError(f"{str(name_or_path)!r} has no {RECORD}: it is not the output of `vaccine-trainer "
                                "finetune` (load a plain adapter with peft's PeftModel.from_pretrained).")
    record = json.loads(record_path.read_text())
    alignment = folder / record["alignment_adapter"] if record.get("alignment_adapter") else None
    return merged_model(record["base_model"], alignment, folder / record.get("stage2_adapter", "."),
                        **load_kwargs).eval()


def merged_model(base: str | os.PathLike, alignment_adapter=None, adapter=None, **load_kwargs: Any):
    """Base weights with the stage-1 adapter merged, then the stage-2 adapter merged on top: plain weights."""
    from peft import PeftModel

    from .sft import merge_alignment_adapter

    model = merge_alignment_adapter(base, alignment_adapter, **load_kwargs)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


__all__ = ["alignment_settings", "load_finetuned_model", "merged_model", "write_stage2_record"]
