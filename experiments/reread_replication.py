"""The replication's SFT-vs-Vaccine (rho 2) cells re-read with 95% intervals and judge-corrected scores (runs no model).

Each cell's per-prompt verdicts are rebuilt from what was committed: the harmful scores of docs/replication/summary.json
(200 prompts, so flagged = score x 2) and the per-prompt discordant splits that `experiments/paired_prompts.py` printed
and docs/replication.md records (prompts flagged for SFT only, for Vaccine only). A paired difference and its bootstrap
depend on nothing else: only the 2x2 table of (SFT flagged, Vaccine flagged) counts. The learned judge's sensitivity
and specificity come from docs/judges/judges.json (held-out BeaverTails pairs), its counts recovered from the rates.

    python experiments/reread_replication.py            # prints the Markdown tables of docs/replication.md

The three seeds were judged on the same 200 prompts, which the 2x2 tables do not tie together: "mean of 3" resamples
each seed's prompts apart (as if independent); "widest" places every seed's discordant prompts on the same prompts as
far as the counts allow and draws the prompts once for all seeds, the widest interval the committed counts permit.
The exact interval lies between; `vaccine-trainer grid --summary_only true` computes it from the saved evaluations.
"""

from __future__ import annotations

import json
from pathlib import Path

from vaccine_harness.evaluation.intervals import (
    JudgeErrors, corrected_rate, paired_difference, stratified_paired_difference, wilson_percent,
)
from vaccine_trainer.markdown import with_interval

DOCS = Path(__file__).resolve().parents[1] / "docs"
PROMPTS = 200
# (p, seed): (prompts flagged for SFT only, for Vaccine only), from docs/replication.md.
DISCORDANT = {
    (0.1, 42): (19, 15), (0.1, 43): (31, 23), (0.1, 44): (31, 18),
    (0.0, 42): (12, 19), (0.0, 43): (25, 26), (0.0, 44): (25, 17),
    (0.2, 42): (28, 21), (0.2, 43): (20, 22), (0.2, 44): (30, 19),
}


def learned_judge_errors() -> JudgeErrors:
    """Counts behind the learned judge's held-out recall and false-positive rate (n, accuracy fix the class sizes)."""
    row = next(r for r in json.loads((DOCS / "judges" / "judges.json").read_text())
               if r["judge"] == "learned" and "held-out" in r["labelled"])
    n, accuracy, recall, fpr = row["n"], row["accuracy"] / 100, row["recall"] / 100, row["false_positive_rate"] / 100
    positives = round((accuracy * n - (1 - fpr) * n) / (recall - (1 - fpr)))
    negatives = n - positives
    return JudgeErrors(round(recall * positives), positives, round((1 - fpr) * negatives), negatives)


def cell_verdicts(scores: dict, ratio: float, seed: int) -> tuple[list[bool], list[bool]]:
    """(Vaccine, SFT) verdicts on the same 200 prompts with the committed scores and discordant split."""
    sft_only, vaccine_only = DISCORDANT[ratio, seed]
    sft, vaccine = (round(scores[seed, ratio, arm] * PROMPTS / 100) for arm in ("sft", "vaccine"))
    both = sft - sft_only
    if both + vaccine_only != vaccine or both < 0:
        raise SystemExit(f"p={ratio} seed {seed}: the split {sft_only}/{vaccine_only} does not fit the scores "
                         f"{sft}/{vaccine} of summary.json")
    neither = PROMPTS - both - sft_only - vaccine_only
    vaccine_verdicts = [True] * both + [False] * sft_only + [True] * vaccine_only + [False] * neither
    sft_verdicts = [True] * both + [True] * sft_only + [False] * vaccine_only + [False] * neither
    return vaccine_verdicts, sft_verdicts


def coinciding_discordance(ratio: float) -> list[tuple[list[bool], list[bool]]]:
    """(Vaccine, SFT) verdicts per seed with the discordant prompts on the same prompts across seeds as far as the
    counts allow: SFT-only from the first prompt on, Vaccine-only from the last prompt back (the prompts flagged for
    both or neither do not move a paired difference)."""
    groups = []
    for seed in (42, 43, 44):
        sft_only, vaccine_only = DISCORDANT[ratio, seed]
        groups.append(([False] * (PROMPTS - vaccine_only) + [True] * vaccine_only,
                       [True] * sft_only + [False] * (PROMPTS - sft_only)))
    return groups


def main() -> None:
    summary = json.loads((DOCS / "replication" / "summary.json").read_text())
    scores = {(r["seed"], r["harmful_ratio"], r["method"]): r["harmful_score"] for r in summary["rows"]}
    errors = learned_judge_errors()
    print(f"learned judge (held-out BeaverTails): sensitivity {errors.sensitivity:.3f} ({errors.true_positives}/"
          f"{errors.positives}), specificity {errors.specificity:.3f} ({errors.true_negatives}/{errors.negatives}), "
          f"Youden's J {errors.youden:.3f}\n")
    print("| p | seed | SFT (%) [95% CI] | Vaccine (%) [95% CI] | SFT corrected (%) | Vaccine corrected (%) "
          "| Vaccine − SFT (points) [95% CI] | corrected (points) [95% CI] |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ratio in (0.0, 0.1, 0.2):
        groups = []
        for seed in (42, 43, 44):
            vaccine, sft = cell_verdicts(scores, ratio, seed)
            groups.append((vaccine, sft))
            cells = []
            for verdicts in (sft, vaccine):
                cells.append(with_interval(100 * sum(verdicts) / PROMPTS, wilson_percent(sum(verdicts), PROMPTS)))
            for verdicts in (sft, vaccine):
                corrected = corrected_rate(sum(verdicts), PROMPTS, errors)
                cells.append(with_interval(corrected.value, corrected.ci95))
            difference, low, high = paired_difference(vaccine, sft)
            one = stratified_paired_difference([(vaccine, sft)], errors)
            corrected = one["corrected"]
            print(f"| {ratio:g} | {seed} | " + " | ".join(cells)
                  + f" | {with_interval(100 * difference, (100 * low, 100 * high), signed=True)}"
                  + f" | {with_interval(corrected['value'], corrected['ci95'], signed=True)} |")
        pooled = stratified_paired_difference(groups, errors)
        corrected = pooled["corrected"]
        print(f"| {ratio:g} | mean of 3 | | | | | {with_interval(pooled['difference'], pooled['ci95'], signed=True)} "
              f"| {with_interval(corrected['value'], corrected['ci95'], signed=True)} |")
        widest = stratified_paired_difference(coinciding_discordance(ratio), errors, shared_items=True)
        corrected = widest["corrected"]
        print(f"| {ratio:g} | mean of 3, widest | | | | | "
              f"{with_interval(widest['difference'], widest['ci95'], signed=True)} "
              f"| {with_interval(corrected['value'], corrected['ci95'], signed=True)} |")


if __name__ == "__main__":
    main()
