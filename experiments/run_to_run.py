"""Two runs of the same cell (one arm, one seed, one attacker), compared prompt by prompt from their verdict files:
how far a change that should not matter (another thread count, another machine) moves a cell. Runs no model.

    python experiments/run_to_run.py FIRST.json SECOND.json [--json OUT.json]

Prints each run's harmful score and SST2 accuracy, the prompts whose verdict flipped each way, the exact McNemar
p of those flips and the paired difference with its 95% bootstrap interval (second minus first, points).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from vaccine_harness.evaluation.intervals import exact_mcnemar, paired_difference

SAME_CELL = ("method", "seed", "harmful_ratio", "learning_rate", "epochs", "num_prompts")


def compare(first: dict, second: dict) -> dict:
    """The two files' rows must name the same cell and their verdicts the same prompts."""
    differing = [key for key in SAME_CELL if first["row"].get(key) != second["row"].get(key)]
    if differing:
        raise ValueError(f"the files are not two runs of one cell: they differ in {differing}")
    if first["verdicts"].keys() != second["verdicts"].keys():
        raise ValueError("the files judge different prompts")
    prompts = sorted(first["verdicts"])
    a = [bool(first["verdicts"][p]) for p in prompts]
    b = [bool(second["verdicts"][p]) for p in prompts]
    only_first = sum(x and not y for x, y in zip(a, b))
    only_second = sum(y and not x for x, y in zip(a, b))
    difference, low, high = paired_difference(b, a)
    return {
        "cell": {key: first["row"][key] for key in SAME_CELL},
        "harmful_score": [100 * sum(a) / len(a), 100 * sum(b) / len(b)],
        "accuracy": [first["row"].get("accuracy"), second["row"].get("accuracy")],
        "flagged_in_first_only": only_first, "flagged_in_second_only": only_second,
        "mcnemar_p": exact_mcnemar(only_first, only_second),
        "difference_points": [100 * difference, 100 * low, 100 * high],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    args = parser.parse_args(argv)
    try:
        result = compare(json.loads(args.first.read_text()), json.loads(args.second.read_text()))
    except ValueError as error:
        parser.error(str(error))
    (first, second), (low, high) = result["harmful_score"], result["difference_points"][1:]
    print(f"harmful score {first:.1f}% -> {second:.1f}% ({result['difference_points'][0]:+.1f} points, paired 95% "
          f"[{low:+.1f}, {high:+.1f}]); SST2 {result['accuracy'][0]} -> {result['accuracy'][1]}; flipped: "
          f"{result['flagged_in_first_only']} flagged in the first run only, {result['flagged_in_second_only']} in "
          f"the second only (McNemar p {result['mcnemar_p']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
