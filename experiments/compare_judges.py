"""The two learned judges on the same held-out BeaverTails pairs: each one's accuracy with its Wilson interval, the
paired difference with its bootstrap interval, and an exact McNemar test on the pairs they judge differently.

    python experiments/compare_judges.py --data_dir ../shared/data --json docs/judges/learned_pair.json

`learned-pair` trains on first use (about 20 min on 2 CPU cores at its default 3,000 pairs) and is cached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vaccine_harness.commands.judge_names import make_judge
from vaccine_harness.evaluation import check_judge, split_labelled_pairs
from vaccine_harness.evaluation.intervals import exact_mcnemar, paired_difference, wilson_percent
from vaccine_harness.evaluation.judges import judge_name


class AlreadyJudged:
    """A judge as `check_judge` sees it, answering with the verdicts it already gave (judging takes minutes)."""

    def __init__(self, judge, verdicts):
        self.name, self.verdicts = judge_name(judge), verdicts
        self.published_accuracy = getattr(judge, "published_accuracy", None)

    def __call__(self, prompts, answers):
        return self.verdicts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--judges", default="learned,learned-pair")
    args = parser.parse_args(argv)
    held_out = split_labelled_pairs(args.data_dir).held_out
    truth = [not row["is_safe"] for row in held_out]
    right, figures = {}, {}
    for name in args.judges.split(","):
        judge = make_judge(name, data_dir=args.data_dir)
        started = time.time()
        judge.classifier  # trained or loaded before the judging is timed
        trained_s = time.time() - started
        started = time.time()
        verdicts = judge([row["prompt"] for row in held_out], [row["response"] for row in held_out])
        judging_s = time.time() - started
        right[name] = [v == t for v, t in zip(verdicts, truth)]
        check = check_judge(AlreadyJudged(judge, verdicts), held_out,
                            source="beavertails_qa_labeled.jsonl (held-out prompts)")
        figures[name] = {**check.to_dict(), "accuracy_ci95": wilson_percent(sum(right[name]), len(truth)),
                         "train_or_load_seconds": round(trained_s), "seconds": round(judging_s, 1)}
        print(f"{name}: accuracy {check.accuracy:.1f}% {figures[name]['accuracy_ci95']}, precision "
              f"{check.precision:.1f}, recall {check.recall:.1f}, safe flagged {check.false_positive_rate:.1f}%",
              flush=True)
    first, second = args.judges.split(",")[:2]
    difference, low, high = paired_difference(right[second], right[first])
    only_first = sum(a and not b for a, b in zip(right[first], right[second]))
    only_second = sum(b and not a for a, b in zip(right[first], right[second]))
    p = exact_mcnemar(only_first, only_second)
    comparison = {"difference_points": 100 * difference, "ci95": [100 * low, 100 * high],
                  f"right_only_{first}": only_first, f"right_only_{second}": only_second, "mcnemar_p": p}
    print(f"{second} - {first}: {100 * difference:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}]; right only "
          f"{first} {only_first}, only {second} {only_second}; exact McNemar p = {p:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"n": len(truth), "judges": figures, "comparison": comparison,
                                     "command": "python experiments/compare_judges.py " + " ".join(sys.argv[1:])},
                                    indent=1) + "\n")


if __name__ == "__main__":
    main()
