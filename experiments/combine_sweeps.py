"""Combine `sweep` summaries whose cells ran in different output folders into one summary.

Issue 30's seed-42 sweep ran its first 20 cells on a machine that was shut down before the last 4 ran: their
evaluation folders went with it, their committed `sweep.json` did not, and the last 4 ran in a new folder. A
summary keeps every cell's figures and its comparison with SFT, so those combine; the worst case and the mean per
arm are recomputed over every row. What does not combine is the targets' paired intervals: they resample the
prompts once for every cell, which needs every cell's verdict per prompt, and a summary does not keep those. The
combined summary therefore has no `paired_targets`; each part's stay in its own summary.

    python experiments/combine_sweeps.py OUTPUT_DIR PART.json [PART.json ...]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vaccine_harness.commands.sweep import worst_cases, write_sweep_summary
from vaccine_harness.commands.sweep_pairs import cell_key


def _gather(parts: Mapping[str, Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    """Every part's `key` entries, refusing a cell that two parts both hold: which to keep is not this script's
    call."""
    entries, seen = [], {}
    for source, summary in parts.items():
        for entry in summary.get(key, []):
            if cell_key(entry) in seen:
                raise ValueError(f"{key}: cell {cell_key(entry)} is in both {seen[cell_key(entry)]} and {source}: "
                                 "combine parts whose cells differ.")
            seen[cell_key(entry)] = source
            entries.append(entry)
    return entries


def combine(parts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One summary from several (`{source: sweep.json contents}`), with the same guard."""
    guards = {summary["guard_points"] for summary in parts.values()}
    if len(guards) != 1:
        raise ValueError(f"The parts use different guards ({sorted(guards)} points): their worst cases differ in "
                         "meaning, so they do not combine.")
    (guard,) = guards
    rows, cells = _gather(parts, "rows"), _gather(parts, "paired_cells")
    note = (f"Combined from {', '.join(parts)} by experiments/combine_sweeps.py. No paired interval for the worst "
            "case or the mean here: those resample the prompts once for every cell, which needs every cell's "
            "verdict per prompt; each part's summary has its own.")
    return {"settings": {"combined_from": list(parts)}, "notes": [note], "guard_points": guard,
            # the largest plan among the parts: the one that planned the whole grid
            "planned_cells": max(max(summary["planned_cells"] for summary in parts.values()), len(rows)),
            "rows": rows, "worst_cases": worst_cases(rows, guard), "paired_targets": [], "paired_cells": cells,
            "unfinished_jobs": []}


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    output, sources = Path(argv[0]), argv[1:]
    parts = {source: json.loads(Path(source).read_text()) for source in sources}
    paths = write_sweep_summary(output, combine(parts))
    print(f"combined {len(sources)} summaries into {paths['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
