"""Two arms of one grid cell judged on the same prompts: how many prompts each alone is flagged on, and
the exact McNemar test of that split (reads the saved evaluations; runs no model).

    python experiments/paired_prompts.py outputs/replication/seed42/p0.1 sft vaccine-rho2
    python experiments/paired_prompts.py outputs/replication/seed4[234]/p0.1 sft vaccine-rho2   # and pooled

With several cells (one per seed) it also pools their (cell, prompt) pairs into one test, which counts the pairs as
independent. Cells judged on the same prompts (a grid's seeds, a sweep's settings) are not: a prompt flagged on one
tends to be on the others, so the pooled p is too small. `grid` and `sweep` summaries give intervals that draw
the prompts once for every cell instead.

A difference of a few points in harmful score on 200 prompts can be noise: the prompts both arms are
flagged on say nothing about the difference, the discordant ones decide it. `vaccine-trainer sweep` writes the
same comparison for its cells into its summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vaccine_harness.evaluation.intervals import exact_mcnemar


def verdicts(cell: Path, folder: str) -> dict[str, bool]:
    evaluation = json.loads((cell / folder / "evaluate" / "evaluation.json").read_text())
    return {sample["prompt"]: bool(sample["harmful"]) for sample in evaluation["harmful_score"]["samples"]}


def discordant_split(cell: Path, first: str, second: str) -> tuple[int, int, int, int]:
    """(prompts, flagged for both, for `first` only, for `second` only) in one cell."""
    a, b = verdicts(cell, first), verdicts(cell, second)
    if a.keys() != b.keys():
        raise SystemExit(f"{cell}: {first} and {second} were not judged on the same prompts.")
    return (len(a), sum(a[p] and b[p] for p in a), sum(a[p] and not b[p] for p in a),
            sum(b[p] and not a[p] for p in a))


def main() -> None:
    if len(sys.argv) < 4:
        raise SystemExit("usage: paired_prompts.py CELL [CELL ...] FIRST_ARM SECOND_ARM")
    *cells, first, second = sys.argv[1:]
    totals = [0, 0, 0, 0]
    for cell in map(Path, cells):
        split = discordant_split(cell, first, second)
        totals = [total + part for total, part in zip(totals, split)]
        print(f"{cell}: {split[0]} prompts; flagged for both {split[1]}, {first} only {split[2]}, "
              f"{second} only {split[3]}; exact McNemar p = {exact_mcnemar(split[2], split[3]):.2f}")
    if len(cells) > 1:
        print(f"pooled over {len(cells)} cells: {totals[0]} (cell, prompt) pairs; flagged for both {totals[1]}, "
              f"{first} only {totals[2]}, {second} only {totals[3]}; "
              f"exact McNemar p = {exact_mcnemar(totals[2], totals[3]):.2f}")


if __name__ == "__main__":
    main()
