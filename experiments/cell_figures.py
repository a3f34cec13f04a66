"""One table row per finished evaluation under a grid's output folder (reads files; runs no model).

    python experiments/cell_figures.py outputs/pilot_regime

Beside the learned judge's harmful score: the non-refusal rate (refusal judge), empty and short
(< 5 words) answers, SST2 accuracy, the judge-free metrics and the evaluation's wall time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vaccine_harness.evaluation import non_refusal_rate


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/pilot_regime")
    print("| method | seed | p | harmful score | judge | non-refusal | empty | < 5 words | SST2 | harmful NLL ↑ "
          "| held-out align. loss ↓ | refusal pref. ↑ | eval s |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for path in sorted(root.glob("seed*/p*/*/evaluate/evaluation.json")):
        result = json.loads(path.read_text())
        harm, samples = result["harmful_score"], result["harmful_score"]["samples"]
        answers = [s["answer"] for s in samples]
        non_refusal = non_refusal_rate(answers)
        likelihood = result.get("likelihood") or {}
        method, ratio, seed = path.parts[-3], path.parts[-4], path.parts[-5]

        def num(key, digits=3):
            value = likelihood.get(key)
            return "–" if value is None else f"{value:.{digits}f}"

        empty = sum(not a.strip() for a in answers)
        short = sum(len(a.split()) < 5 for a in answers)
        print(f"| {method} | {seed[4:]} | {ratio[1:]} | {harm['score']:.1f} | {harm['settings']['judge']} "
              f"| {non_refusal:.1f} | {empty} | {short} | {result['accuracy']['accuracy']:.1f} "
              f"| {num('harmful_answer_nll')} | {num('held_out_alignment_loss')} "
              f"| {num('refusal_preference', 1)} | {result['wall_time_s']:.0f} |")


if __name__ == "__main__":
    main()
