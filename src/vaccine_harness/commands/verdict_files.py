"""Each evaluated sweep cell's figures and per-prompt verdicts as a small file of its own, kept with the summary.

A summary's worst case, mean and paired intervals need every cell's verdict per prompt; the evaluation folders that
hold them are too large to commit (and go with the machine that ran them). One JSON file per (cell, arm): the row
of the summary and, per prompt, whether the judge flagged the answer. Prompts are named by a hash of their text,
so the files pair across arms and seeds without copying the prompts into the repository.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .sweep_pairs import CellKey, Verdicts, cell_key

VERDICTS_DIR = "verdicts"


def prompt_id(prompt: str) -> str:
    """A stable name for a prompt: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def verdict_file_name(row: Mapping[str, Any]) -> str:
    method = "-".join(str(row["method"]).replace("=", "").split())
    return (f"seed{row['seed']}-p{row['harmful_ratio']:g}-lr{row['learning_rate']:g}-ep{row['epochs']:g}"
            f"-{method}.json")


def by_prompt_id(verdicts: Verdicts) -> dict[str, bool]:
    """A cell's verdicts keyed by `prompt_id`: what the files keep, and what a sweep summarises, so that a summary
    recomputed from the files pairs the same prompts in the same order."""
    return {prompt_id(prompt): bool(flag) for prompt, flag in verdicts.items()}


def write_verdict_files(folder: Path, rows: Sequence[Mapping[str, Any]], verdicts: Mapping[CellKey, Verdicts]
                        ) -> list[Path]:
    """One file per row that has verdicts (keyed by `prompt_id` already); returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for row in rows:
        cell_verdicts = verdicts.get(cell_key(row))
        if not cell_verdicts:
            continue
        path = folder / verdict_file_name(row)
        record = {"row": dict(row),
                  "verdicts": {prompt: bool(flag) for prompt, flag in cell_verdicts.items()}}
        path.write_text(json.dumps(record, indent=0, sort_keys=True) + "\n")
        written.append(path)
    return written


def read_verdict_files(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], dict[CellKey, Verdicts]]:
    """The rows and verdicts of the files (or of every `*.json` in folders) given; a cell given twice is refused."""
    files = [f for p in paths for f in (sorted(Path(p).glob("*.json")) if Path(p).is_dir() else [Path(p)])]
    rows, verdicts = [], {}
    for path in files:
        record = json.loads(path.read_text())
        row = record["row"]
        if cell_key(row) in verdicts:
            raise ValueError(f"{path}: cell {cell_key(row)} is given twice; keep one file per cell.")
        rows.append(row)
        verdicts[cell_key(row)] = record["verdicts"]
    return rows, verdicts


def with_reference_accuracy(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows, each attack cell's missing `benign_accuracy` (the guard's reference) taken from its seed's and arm's
    p = 0 reference file among them: a cell redone on a machine that lost the reference's run has none of its own.
    A cell whose own reference differs from the file's was run against another stage 1, and is refused."""
    references = {(row["seed"], row["method"]): row.get("accuracy") for row in rows if row.get("reference")}
    filled = []
    for row in rows:
        row = dict(row)
        reference = references.get((row["seed"], row["method"]))
        if not row.get("reference") and reference is not None:
            if row.get("benign_accuracy") is None:
                row["benign_accuracy"] = reference
            elif row["benign_accuracy"] != reference:
                raise ValueError(
                    f"Cell {cell_key(row)}: its benign-only accuracy {row['benign_accuracy']} is not its reference "
                    f"file's {reference}; it was run against another stage 1. Summarise it apart.")
        filled.append(row)
    return filled
