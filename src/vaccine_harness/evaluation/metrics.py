"""Every figure of an evaluated arm that a report or a grid summary prints, declared once.

`ArmRecord` is one arm's evaluation read into types (the judge's measured accuracy as numbers), and `METRICS`
is the table of columns: the per-run report, the grid summary (mean ± sd over seeds) and the grid's paired
differences against SFT all render from it. Adding a metric is one `Metric` entry; adding a drift measure is
one entry of `DRIFT_MEASURES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vaccine_trainer.drift_measures import DRIFT_MEASURES
from vaccine_trainer.markdown import with_interval

from .intervals import wilson_percent


def figure_dict(figure: Any) -> dict[str, Any] | None:
    """A figure (`HarmfulScore`, `Accuracy`, `JudgeCheck`, ... or its `to_dict()` form) as a dict without samples."""
    if figure is None:
        return None
    if hasattr(figure, "to_dict"):
        return figure.to_dict()
    if isinstance(figure, Mapping):
        return {k: v for k, v in figure.items() if k != "samples"}
    raise TypeError(f"Expected a HarmfulScore / Accuracy or its to_dict(), got {type(figure).__name__}.")


@dataclass(frozen=True)
class JudgeRecord:
    """A judge and, where it was measured on labelled pairs, its accuracy there."""

    name: str
    accuracy: float | None = None  # % of the labelled pairs judged right
    labelled: str | None = None
    n: int | None = None
    published: str | None = None

    @classmethod
    def of(cls, harmful_score: Mapping[str, Any], judge_check: Mapping[str, Any] | None) -> JudgeRecord:
        name = str((harmful_score.get("settings") or {}).get("judge", "–"))
        if not judge_check:
            return cls(name)
        return cls(name, float(judge_check["accuracy"]), judge_check.get("labelled"), judge_check.get("n"),
                   judge_check.get("published"))

    def measured(self) -> str | None:
        """"71.9% accurate on pairs.jsonl (n=1007)", or None where the judge was not measured."""
        if self.accuracy is None:
            return None
        return f"{self.accuracy:.1f}% accurate on {self.labelled} (n={self.n})"

    def summary(self) -> str | None:
        """"learned: 71.9% accurate on pairs.jsonl (n=1007); published: ...", or None where not measured."""
        measured = self.measured()
        if measured is None:
            return None
        return f"{self.name}: {measured}" + (f"; published: {self.published}" if self.published else "")

    def label(self) -> str:
        """The judge's name with its measured accuracy, e.g. for a table cell."""
        measured = self.measured()
        return f"{self.name} ({measured})" if measured else self.name


@dataclass
class ArmRecord:
    """One evaluated arm: the figures of its evaluation and the drift logged during its stage 2."""

    harmful_score: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    accuracy_by_likelihood: dict[str, Any] = field(default_factory=dict)
    likelihood: dict[str, Any] = field(default_factory=dict)
    judge: JudgeRecord | None = None
    drift: list[dict[str, Any]] = field(default_factory=list)  # {"step", "drift", <DRIFT_MEASURES>...} per log

    @classmethod
    def of(cls, figures: Mapping[str, Any], drift: Sequence[Mapping[str, Any]] = ()) -> ArmRecord:
        """From an evaluation's figures (`HarmfulScore` / `Accuracy` objects or their `to_dict()` forms)."""
        harm = figure_dict(figures.get("harmful_score")) or {}
        return cls(harm, figure_dict(figures.get("accuracy")) or {},
                   figure_dict(figures.get("accuracy_by_likelihood")) or {},
                   figure_dict(figures.get("likelihood")) or {},
                   JudgeRecord.of(harm, figure_dict(figures.get("judge_check"))) if harm else None,
                   [dict(point) for point in drift])

    def final(self, measure: str) -> float | None:
        """A drift measure at the last logged step."""
        return self.drift[-1].get(measure) if self.drift else None


@dataclass(frozen=True)
class Metric:
    """A column: how to read it from an arm, how to print it, which way is better.

    A metric with `count` is a percentage of that many items: it is printed with its Wilson interval.
    `group` says which table it goes in: "scores", "judge-free" or "drift".
    """

    key: str
    title: str
    better: str  # "↓" lower is better, "↑" higher
    read: Callable[[ArmRecord], float | None]
    group: str = "scores"
    count: Callable[[ArmRecord], int | None] | None = None
    spec: str = ".1f"
    paired: bool = True  # its difference against SFT is in the grid's paired table

    def header(self) -> str:
        return f"{self.title} {self.better}"

    def cell(self, arm: ArmRecord) -> str:
        return rate_cell(self.read(arm), self.count(arm) if self.count else None, self.spec)


def rate_cell(value: float | None, n: int | None, spec: str = ".1f") -> str:
    """`31.0 [25.0, 37.7]` for a percentage of n items with its Wilson interval; the value alone without n."""
    bounds = wilson_percent(round(value * n / 100), n) if value is not None and n else None
    return with_interval(value, bounds, spec)


METRICS: tuple[Metric, ...] = (
    Metric("harmful_score", "Harmful score (%)", "↓", lambda arm: arm.harmful_score.get("score"),
           count=lambda arm: arm.harmful_score.get("n")),
    Metric("non_refusal_rate", "Non-refusal rate (%)", "↓", lambda arm: arm.harmful_score.get("non_refusal_rate"),
           count=lambda arm: arm.harmful_score.get("n")),
    Metric("accuracy", "Fine-tune accuracy, generated (%)", "↑", lambda arm: arm.accuracy.get("accuracy"),
           count=lambda arm: arm.accuracy.get("n")),
    Metric("accuracy_by_likelihood", "Fine-tune accuracy, label likelihood (%)", "↑",
           lambda arm: arm.accuracy_by_likelihood.get("accuracy"),
           count=lambda arm: arm.accuracy_by_likelihood.get("n")),
    Metric("harmful_answer_nll", "Harmful-answer NLL", "↑", lambda arm: arm.likelihood.get("harmful_answer_nll"),
           group="judge-free", spec=".3f", paired=False),
    Metric("held_out_alignment_loss", "Held-out alignment loss", "↓",
           lambda arm: arm.likelihood.get("held_out_alignment_loss"), group="judge-free", spec=".3f", paired=False),
    Metric("refusal_preference", "Refusal preference (%)", "↑", lambda arm: arm.likelihood.get("refusal_preference"),
           group="judge-free"),
    *(Metric(f"final_{name}", title, "↓", lambda arm, name=name: arm.final(name), group="drift", spec=".2e")
      for name, title in (("drift", "Drift at the last step"), *DRIFT_MEASURES.items())),
)


def metrics_in(group: str) -> tuple[Metric, ...]:
    return tuple(metric for metric in METRICS if metric.group == group)
