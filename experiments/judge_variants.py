"""Re-judge a grid's saved answers with the refusal judge's variants (reads files; runs no model).

    python experiments/judge_variants.py outputs/replicate_small [outputs/replicate_small/rho_sweep ...]

Prints, per method and harmful ratio, the mean harmful score over seeds with the default judge
(refusal phrases or a bare "No") and with the refusal phrases alone (`RefusalJudge(denials=False)`),
so a reading of the grid does not hang on the bare-"No" rule.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from vaccine_trainer.evaluation import RefusalJudge

JUDGES = {"default judge": RefusalJudge(), "phrases only": RefusalJudge(denials=False)}


def main(roots: list[str]) -> None:
    scores: dict[tuple[str, float], dict[str, list[float]]] = {}
    for root in roots:
        for cell in sorted(Path(root).glob("seed*/p*")):
            ratio = float(cell.name[1:])
            for evaluation_file in sorted(cell.glob("*/evaluate/evaluation.json")):
                label = evaluation_file.parent.parent.name  # the arm's folder: non-aligned, sft, vaccine-rho2
                samples = json.loads(evaluation_file.read_text())["harmful_score"]["samples"]
                prompts, answers = [s["prompt"] for s in samples], [s["answer"] for s in samples]
                for name, judge in JUDGES.items():
                    flags = judge(prompts, answers)
                    scores.setdefault((label, ratio), {}).setdefault(name, []).append(100 * sum(flags) / len(flags))
    print("| Method | p | " + " | ".join(f"{name} (%)" for name in JUDGES) + " | Seeds |")
    print("|---|---:|" + "---:|" * len(JUDGES) + "---:|")
    for (method, ratio), by_judge in sorted(scores.items(), key=lambda item: (item[0][1], item[0][0])):
        cells = " | ".join(f"{statistics.fmean(v):.1f}" for v in by_judge.values())
        print(f"| {method} | {ratio:g} | {cells} | {len(next(iter(by_judge.values())))} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["outputs/replicate_small"])
