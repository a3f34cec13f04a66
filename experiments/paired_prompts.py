"""Two arms of one grid cell judged on the same prompts: how many prompts each alone is flagged on, and
the exact McNemar test of that split (reads the saved evaluations; runs no model).

    python experiments/paired_prompts.py outputs/replication/seed42/p0.1 sft vaccine-rho2

A difference of a few points in harmful score on 200 prompts can be noise: the prompts both arms are
flagged on say nothing about the difference, the discordant ones decide it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scipy.stats import binomtest


def verdicts(cell: Path, folder: str) -> dict[str, bool]:
    evaluation = json.loads((cell / folder / "evaluate" / "evaluation.json").read_text())
    return {sample["prompt"]: bool(sample["harmful"]) for sample in evaluation["harmful_score"]["samples"]}


def main() -> None:
    cell, first, second = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    a, b = verdicts(cell, first), verdicts(cell, second)
    if a.keys() != b.keys():
        raise SystemExit(f"{first} and {second} were not judged on the same prompts.")
    both = sum(a[p] and b[p] for p in a)
    only_a = sum(a[p] and not b[p] for p in a)
    only_b = sum(b[p] and not a[p] for p in a)
    p_value = binomtest(only_b, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    print(f"{cell}: {len(a)} prompts; flagged for both {both}, {first} only {only_a}, {second} only {only_b}; "
          f"exact McNemar p = {p_value:.2f}")


if __name__ == "__main__":
    main()
