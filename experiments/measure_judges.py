"""Every offline judge on both labelled files: the table of docs/judges.md (runs no language model).

    python experiments/measure_judges.py [--data_dir ../shared/data] [--output docs/judges/judges.json]

For each judge: accuracy, precision, recall and safe answers flagged on the held-out BeaverTails pairs
(prompts the learned judge never saw) and on all SafeRLHF pairs (training data of the learned judge:
not a measurement of it, shown so the gap is visible), the share of the 2,483 known refusals of
alignment_refusals.jsonl flagged, training time, and the time to judge 200 answers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vaccine_harness.evaluation import LearnedJudge, RefusalJudge, check_judge, split_labelled_pairs
from vaccine_harness.evaluation.learned_judge import SAFERLHF_FILE, read_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="../shared/data")
    parser.add_argument("--output", default="docs/judges/judges.json")
    args = parser.parse_args()
    data = Path(args.data_dir)
    held_out = split_labelled_pairs(data).held_out
    saferlhf = read_jsonl(data / SAFERLHF_FILE)
    refusals = read_jsonl(data / "alignment_refusals.jsonl")
    results = []
    for name, build in (("refusal", RefusalJudge), ("learned", lambda: LearnedJudge(data, cache_dir=Path(
            args.output).parent / "cache"))):
        judge = build()
        started = time.perf_counter()
        if hasattr(judge, "classifier"):
            judge.classifier  # noqa: B018  train (or load) before judging is timed
        training_s = time.perf_counter() - started
        started = time.perf_counter()
        judge([r["prompt"] for r in held_out[:200]], [r["response"] for r in held_out[:200]])
        judge_200_s = time.perf_counter() - started
        for rows, source in ((held_out, "beavertails_qa_labeled.jsonl (held-out prompts)"),
                             (saferlhf, f"{SAFERLHF_FILE}" + (" (its training data)" if name == "learned" else ""))):
            check = check_judge(judge, rows, source=source, refusals=refusals)
            results.append({**check.to_dict(), "training_s": round(training_s, 1),
                            "judge_200_s": round(judge_200_s, 2)})
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print("| judge | labelled pairs | n | accuracy | precision | recall | safe flagged | refusals flagged "
          "| training | 200 answers |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['judge']} | {r['labelled']} | {r['n']} | {r['accuracy']:.1f}% | {r['precision']:.1f}% | "
              f"{r['recall']:.1f}% | {r['false_positive_rate']:.1f}% | {r['refusals_flagged']:.1f}% | "
              f"{r['training_s']:.1f} s | {r['judge_200_s']:.2f} s |")


if __name__ == "__main__":
    main()
