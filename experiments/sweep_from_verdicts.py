"""Recompute a sweep summary (worst cases, means, every paired interval, tables and plots) from the per-cell verdict
files alone, as committed under `docs/.../verdicts/`: no evaluation folder, model or judge is needed.

    python experiments/sweep_from_verdicts.py OUTPUT_DIR VERDICTS [VERDICTS ...] [--guard 5] [--planned N]

VERDICTS are folders of `*.json` verdict files (or single files); cells of several folders combine into one
summary, a cell given twice is refused. The p = 0 references' files (marked `reference`) are not summarised; a cell
whose file has no benign-only accuracy (redone where its reference's run was lost) takes its reference file's.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from vaccine_harness.commands.sweep import summarise_cells, write_sweep_summary
from vaccine_harness.commands.verdict_files import read_verdict_files, with_reference_accuracy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("verdicts", nargs="+", type=Path)
    parser.add_argument("--guard", type=float, default=5.0, help="the guard's points (the sweep's default: 5)")
    parser.add_argument("--planned", type=int, default=None, help="cells planned (default: the cells given)")
    args = parser.parse_args(argv)
    rows, verdicts = read_verdict_files(args.verdicts)
    # the p = 0 references give the guard's accuracy where a cell lacks it, and are never swept
    rows = [row for row in with_reference_accuracy(rows) if not row.get("reference")]
    if not rows:
        parser.error("no verdict file found in the paths given")
    summary = {"settings": {"recomputed_from": [str(p) for p in args.verdicts]},
               **summarise_cells(rows, verdicts, args.guard, args.planned or len(rows)), "unfinished_jobs": []}
    paths = write_sweep_summary(args.output_dir, summary)
    print(f"summary of {len(rows)} cells in {paths['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
