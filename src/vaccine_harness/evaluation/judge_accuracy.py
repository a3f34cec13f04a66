"""How good is a judge? Accuracy, precision and recall on human-labelled (prompt, response, is_safe) pairs.

Every harmful score is only as good as its judge, so the figures here are what a report prints beside
it. "Refusals flagged" is the share of known refusals (safe answers to harmful prompts) that the
judge calls harmful: a judge must not punish a model for refusing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .judges import judge_name

LABELLED_FIELDS = ("prompt", "response", "is_safe")


@dataclass
class JudgeCheck:
    """A judge measured on labelled pairs; harmful (is_safe false) is the positive class."""

    judge: str
    labelled: str
    n: int
    accuracy: float
    precision: float | None
    recall: float | None
    false_positive_rate: float | None
    seconds: float
    refusals_flagged: float | None = None
    refusals_n: int = 0
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    # The counts behind recall and the false-positive rate: what a judge-corrected score needs.
    positives: int = 0
    true_positives: int = 0
    negatives: int = 0
    true_negatives: int = 0
    published: str | None = None  # what the judge's authors (or others) report, where there is a figure

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line, e.g. for a report: "learned: 75.1% accurate on beavertails_qa_labeled.jsonl (n=1009)", with
        the judge's published figure where there is one."""
        line = f"{self.judge}: {self.accuracy:.1f}% accurate on {self.labelled} (n={self.n})"
        return f"{line}; published: {self.published}" if self.published else line

    def errors(self):
        """Sensitivity and specificity with their counts, for `corrected_rate`; None without pairs of both kinds."""
        from .intervals import JudgeErrors

        if self.positives <= 0 or self.negatives <= 0:
            return None
        return JudgeErrors(self.true_positives, self.positives, self.true_negatives, self.negatives)


def validate_labelled(rows: Sequence[Mapping[str, Any]], source: str) -> None:
    if not rows:
        raise ValueError(f"{source} has no rows to measure a judge on.")
    missing = [name for name in LABELLED_FIELDS if name not in rows[0]]
    if missing:
        raise ValueError(f"{source} lacks the fields {missing}: a labelled file needs `prompt`, `response` and "
                         f"`is_safe` (true for a safe answer) on every row; it has {sorted(rows[0])}.")


def _ratio(numerator: int, denominator: int) -> float | None:
    return 100.0 * numerator / denominator if denominator else None


def check_judge(judge: Callable, rows: Sequence[Mapping[str, Any]], *, source: str = "labelled pairs",
                refusals: Sequence[Mapping[str, str]] = ()) -> JudgeCheck:
    """Judge every labelled pair and compare with the human label; optionally judge known refusals.

    ``refusals`` are rows with ``instruction`` (a harmful request) and ``output`` (a safe answer);
    rows with a ``category`` mapping of booleans (BeaverTails) are also scored per harm category
    (recall within the category, over the harmful pairs that carry it).
    """
    validate_labelled(rows, source)
    start = time.perf_counter()
    verdicts = [bool(v) for v in judge([r["prompt"] for r in rows], [r["response"] for r in rows])]
    seconds = time.perf_counter() - start
    truth = [not bool(r["is_safe"]) for r in rows]
    tp = sum(v and t for v, t in zip(verdicts, truth))
    fp = sum(v and not t for v, t in zip(verdicts, truth))
    correct = sum(v == t for v, t in zip(verdicts, truth))
    per_category: dict[str, dict[str, float]] = {}
    for row, verdict, harmful in zip(rows, verdicts, truth):
        categories = row.get("category")
        if not isinstance(categories, Mapping) or not harmful:
            continue
        for name, present in categories.items():
            if present:
                entry = per_category.setdefault(name, {"n": 0, "flagged": 0})
                entry["n"] += 1
                entry["flagged"] += int(verdict)
    for entry in per_category.values():
        entry["recall"] = 100.0 * entry["flagged"] / entry["n"]
    refusal_rate = None
    if refusals:
        flagged = judge([r["instruction"] for r in refusals], [r["output"] for r in refusals])
        refusal_rate = 100.0 * sum(bool(v) for v in flagged) / len(refusals)
    return JudgeCheck(
        judge=judge_name(judge), labelled=Path(source).name, n=len(rows), accuracy=100.0 * correct / len(rows),
        precision=_ratio(tp, sum(verdicts)), recall=_ratio(tp, sum(truth)),
        false_positive_rate=_ratio(fp, len(truth) - sum(truth)), seconds=seconds,
        refusals_flagged=refusal_rate, refusals_n=len(refusals), per_category=dict(sorted(per_category.items())),
        positives=sum(truth), true_positives=tp, negatives=len(truth) - sum(truth),
        true_negatives=len(truth) - sum(truth) - fp, published=getattr(judge, "published_accuracy", None),
    )
