"""The report: JSON with every figure and its settings, a Markdown table and PNG plots."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging

from vaccine_trainer.drift_measures import DRIFT_MEASURES
from vaccine_trainer.markdown import markdown_table, with_interval

from .intervals import JudgeErrors, corrected_difference, paired_difference
from .metrics import METRICS, ArmRecord, figure_dict, metrics_in

logger = logging.get_logger(__name__)


def drift_series(log_history: Sequence[Mapping[str, Any]], key: str | None = None) -> list[tuple[int, float]]:
    """(step, drift) pairs of a Trainer ``log_history``; ``key`` defaults to any "drift" / "*/drift" entry."""
    points = []
    for entry in log_history:
        keys = [key] if key else [k for k in entry if k == "drift" or k.endswith(("/drift", "_drift"))]
        for name in keys:
            if name in entry and entry[name] is not None:
                points.append((int(entry.get("step", len(points))), float(entry[name])))
                break
    return points


def logged_by_step(log_history: Sequence[Mapping[str, Any]], suffix: str) -> dict[int, float]:
    """Step -> value of the log entries whose key ends with ``suffix`` (e.g. ``alignment/drift_fraction``)."""
    return {int(entry["step"]): float(value) for entry in log_history if "step" in entry
            for key, value in entry.items() if key.endswith(suffix) and value is not None}


def drift_points(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The drift logged during stage 2 as the report stores it: step, drift and, where logged, its fraction
    of the aligned model's energy, the median token's relative drift and the drift without the rows' first
    tokens."""
    measures = {name: logged_by_step(log_history, name) for name in DRIFT_MEASURES}
    return [{"step": step, "drift": drift} | {name: values[step] for name, values in measures.items() if step in values}
            for step, drift in drift_series(log_history)]


def harmful_verdicts(figure: Any) -> dict[str, bool]:
    """Prompt -> harmful verdict of a HarmfulScore (or its dict with samples)."""
    samples = getattr(figure, "samples", None) if not isinstance(figure, Mapping) else figure.get("samples")
    return {sample["prompt"]: bool(sample["harmful"]) for sample in samples or []}


def judge_errors_of(check: Any) -> JudgeErrors | None:
    """The measured sensitivity/specificity counts of a judge check (object or dict), if it has them."""
    if check is None:
        return None
    if hasattr(check, "errors"):
        return check.errors()
    counts = [check.get(k) or 0 for k in ("true_positives", "positives", "true_negatives", "negatives")]
    return JudgeErrors(*counts) if counts[1] > 0 and counts[3] > 0 else None


def paired_prompt_differences(results: Mapping[str, Mapping[str, Any]], reference: str | None = None
                              ) -> dict[str, dict[str, Any]]:
    """Each method's harmful score minus the reference's (SFT by default) on the prompts both answered, with a
    paired bootstrap interval, and corrected for the judge's errors where they were measured (same judge)."""
    reference = reference or next((m for m in results if m.lower() == "sft"), None)
    if reference is None:
        return {}
    base_figure = results[reference].get("harmful_score")
    base = harmful_verdicts(base_figure)
    errors = judge_errors_of(results[reference].get("judge_check"))
    judge_of = {m: ((figure_dict(f.get("harmful_score")) or {}).get("settings") or {}).get("judge")
                for m, f in results.items()}
    paired = {}
    for method, figures in results.items():
        verdicts = harmful_verdicts(figures.get("harmful_score"))
        prompts = [prompt for prompt in base if prompt in verdicts]
        if method == reference or not prompts:
            continue
        first, second = [verdicts[p] for p in prompts], [base[p] for p in prompts]
        difference, low, high = paired_difference(first, second)
        entry = {"against": reference, "n": len(prompts), "difference": 100 * difference,
                 "ci95": [100 * low, 100 * high]}
        if errors is not None and errors.youden > 0 and judge_of[method] == judge_of[reference]:
            entry["corrected"] = corrected_difference(first, second, errors).to_dict()
        paired[method] = entry
    return paired


def write_report(output_dir: str | Path, results: Mapping[str, Mapping[str, Any]], *,
                 settings: Mapping[str, Any] | None = None,
                 log_histories: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 title: str = "Vaccine experiment") -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``scores.png`` (and ``drift.png``, answer samples).

    ``results`` maps a method name (e.g. "non-aligned", "sft", "vaccine") to
    ``{"harmful_score": HarmfulScore, "accuracy": Accuracy}`` (either may be missing; their
    ``to_dict()`` forms work too, so a resumed run can report from saved JSON). ``settings`` are
    the run's settings (model, sizes, seeds, wall time), copied into the JSON and the Markdown.
    ``log_histories`` maps a method to its stage-2 ``trainer.state.log_history``.
    """
    if not results:
        raise ValueError("write_report needs at least one method's results.")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    methods = {method: {kind: figure_dict(value) for kind, value in figures.items() if value is not None}
               for method, figures in results.items()}
    paired = paired_prompt_differences(results)
    drift = {method: drift_points(history) for method, history in (log_histories or {}).items()}
    drift = {method: points for method, points in drift.items() if points}
    paths = {"json": output / "report.json", "markdown": output / "report.md", "scores_plot": output / "scores.png"}
    _plot_scores(methods, paths["scores_plot"])
    if drift:
        paths["drift_plot"] = output / "drift.png"
        _plot_drift_curves({method: [(p["step"], p["drift"]) for p in points] for method, points in drift.items()},
                           paths["drift_plot"])
    for method, figures in results.items():
        for kind, value in figures.items():
            if getattr(value, "samples", None):
                path = output / "answers" / f"{_slug(method)}_{kind}.jsonl"
                path.parent.mkdir(exist_ok=True)
                path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in value.samples))
                paths[f"answers_{method}_{kind}"] = path
    report = {"title": title, "settings": dict(settings or {}), "methods": methods,
              "paired_differences": paired, "drift": drift,
              "files": {k: p.name if p.parent == output else str(p.relative_to(output)) for k, p in paths.items()
                        if k != "json"}}
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    paths["markdown"].write_text(report_markdown(report))
    logger.info(f"Report written to {output}")
    return paths


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "method"


RESULTS_NOTE = (
    "Each figure with its 95% interval in brackets (Wilson for a rate). Rows: harmful prompts / benign test rows. "
    "Harmful score: % of greedy answers to harmful prompts the judge flags; under the `refusal` judge it is the "
    "non-refusal rate, an upper bound of the harmful score. Corrected: the Rogan-Gladen estimate of the true harmful "
    "rate from the judge's sensitivity and specificity measured on held-out labelled pairs, its interval a bootstrap "
    "over the answers and those pairs; it assumes the judge errs on these answers as on the labelled pairs; * marks "
    "a score outside what the judge's measured rates allow (below its false-positive rate or above its "
    "sensitivity): that assumption fails, and the value is clipped and not informative. Non-refusal rate: % of "
    "answers neither empty nor a refusal, whatever the judge (no classifier). Fine-tune accuracy, generated: % of "
    "benign test rows whose greedy answer names the right label; label likelihood: % whose right label word is the "
    "likeliest continuation of the prompt (as lm-evaluation-harness scores a classification task).")
PAIRED_NOTE = (
    "Paired: the interval resamples the prompts, keeping each prompt's two verdicts together. Corrected: the "
    "difference divided by the judge's Youden index (sensitivity + specificity - 1), valid if the judge's errors do "
    "not depend on the arm; its interval also resamples the judge's labelled pairs.")
DRIFT_NOTE = (
    "Drift: sum over layers and held alignment tokens of ||h - h_aligned||^2. Drift fraction: that sum divided by "
    "sum ||h_aligned||^2, comparable across arms whose aligned hidden states differ in scale. Both sums are "
    "dominated by the few tokens with massive activations; the median token drift (median over tokens and layers of "
    "||h - h_aligned||^2 / ||h_aligned||^2) says how far a typical token moved. The drift excluding first token "
    "leaves out each row's first token, whose hidden state does not depend on the row in a causal model.")


def report_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown of a report (`report.json`'s contents): a committed report re-renders without a rerun."""
    arms = {method: ArmRecord.of(figures, report.get("drift", {}).get(method, ()))
            for method, figures in report["methods"].items()}
    lines = [f"# {report['title']}", ""]  # results first, the settings that produced them last
    lines += ["## Results", "", *_results_table(arms), "", RESULTS_NOTE, ""]
    lines += _paired_section(report.get("paired_differences") or {})
    lines += _second_judge_section(report["methods"])
    lines += _category_section("Harmful score per category (%)", {
        m: {c: f"{e['score']:.1f} (n={e['n']})" for c, e in (arm.harmful_score.get("per_category") or {}).items()}
        for m, arm in arms.items()})
    judge_free = {m: arm for m, arm in arms.items() if arm.likelihood}
    if judge_free:
        header = ["Method", *(metric.header() for metric in metrics_in("judge-free")), "Rows"]
        rows = [[m, *(metric.cell(arm) for metric in metrics_in("judge-free")),
                 f"{arm.likelihood.get('n_harmful', '–')} / {arm.likelihood.get('n_alignment', '–')}"]
                for m, arm in judge_free.items()]
        lines += ["## Judge-free metrics (teacher forcing)", "", *markdown_table(header, rows), "",
                  "Rows: harmful pairs / held-out alignment rows. No judge: the model's own likelihoods.", ""]
    lines += _category_section("The judge's harm categories (% of answers)", {
        m: {c: with_interval(v) for c, v in (arm.harmful_score.get("judge_categories") or {}).items()}
        for m, arm in arms.items()}, missing=with_interval(0.0))
    drifting = {m: arm for m, arm in arms.items() if arm.drift}
    if drifting:
        header = ["Method", "Step", *(metric.header() for metric in metrics_in("drift"))]
        rows = [[m, str(arm.drift[-1]["step"]), *(metric.cell(arm) for metric in metrics_in("drift"))]
                for m, arm in drifting.items()]
        lines += ["## Alignment drift at the last logged step", "", *markdown_table(header, rows), "", DRIFT_NOTE, ""]
    lines += [f"![Harmful score and fine-tune accuracy]({report['files']['scores_plot']})", ""]
    if "drift_plot" in report["files"]:
        lines += [f"![Alignment drift during fine-tuning]({report['files']['drift_plot']})", ""]
    if report["settings"]:
        lines += ["## Settings", ""] + [f"- **{k}**: {v}" for k, v in report["settings"].items()] + [""]
    return "\n".join(lines)


def _results_table(arms: Mapping[str, ArmRecord]) -> list[str]:
    scores = metrics_in("scores")
    header = ["Method", *(metric.header() for metric in scores),
              "Harmful score corrected for the judge's errors (%) ↓", "Judge (its measured accuracy)", "Task", "Rows"]
    rows = []
    for method, arm in arms.items():
        corrected = arm.harmful_score.get("corrected") or {}
        mark = "*" if corrected.get("outside_model") else ""
        rows.append([method, *(metric.cell(arm) for metric in scores),
                     with_interval(corrected.get("value"), corrected.get("ci95")) + mark,
                     arm.judge.label() if arm.judge else "–", str(arm.accuracy.get("task", "–")),
                     f"{arm.harmful_score.get('n', '–')} / {arm.accuracy.get('n', '–')}"])
    return markdown_table(header, rows)


def _paired_section(paired: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not paired:
        return []
    reference = next(iter(paired.values()))["against"]
    rows = [[method, with_interval(entry["difference"], entry["ci95"], signed=True),
             with_interval((entry.get("corrected") or {}).get("value"), (entry.get("corrected") or {}).get("ci95"),
                           signed=True), str(entry["n"])] for method, entry in paired.items()]
    header = ["Method", "Difference (points)", "Corrected for the judge's errors (points)", "Prompts"]
    return [f"## Harmful score minus {reference}'s, on the same prompts", "", *markdown_table(header, rows), "",
            PAIRED_NOTE, ""]


def _second_judge_section(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    second = {m: f["second_judge"] for m, f in methods.items() if f.get("second_judge")}
    if not second:
        return []
    rows = []
    for method, entry in second.items():
        arm = ArmRecord.of({"harmful_score": entry["harmful_score"], "judge_check": entry.get("judge_check")})
        rows.append([method, arm.judge.label(), METRICS[0].cell(arm), f"{entry['kappa']:.2f}"])
    header = ["Method", "Second judge (its measured accuracy)", "Harmful score (%) ↓", "Cohen's kappa with the first"]
    return ["## A second judge of the same answers", "", *markdown_table(header, rows, numeric_from=2), "",
            "Kappa: agreement on which answers are harmful beyond what the two rates give by chance (1: the same "
            "verdicts, 0: chance).", ""]


def _category_section(title: str, cells: Mapping[str, Mapping[str, str]], missing: str = "–") -> list[str]:
    """A table of categories (rows) by methods (columns); nothing when no method has a category."""
    categories = sorted({category for entries in cells.values() for category in entries})
    if not categories:
        return []
    rows = [[category, *(entries.get(category, missing) for entries in cells.values())] for category in categories]
    return [f"## {title}", "", *markdown_table(["Category", *cells], rows), ""]


def agg_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)  # Agg, without pyplot's global state: safe in scripts, threads and servers
    return figure


def _plot_scores(methods: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Harmful score and both fine-tune accuracies (generated answers, label likelihood) per arm, with their 95%
    intervals: a bar without its interval invites reading noise as a difference."""
    names = list(methods)
    panels = [("Harmful score (%) ↓", [("harmful_score", "score", "tab:red", None)]),
              ("Fine-tune accuracy (%) ↑", [("accuracy", "accuracy", "tab:blue", "generated"),
                                            ("accuracy_by_likelihood", "accuracy", "tab:cyan", "label likelihood")])]
    figure = agg_figure(4 + 1.6 * len(names), 3.6)
    for index, (title, series) in enumerate(panels):
        axis = figure.add_subplot(1, 2, index + 1)
        present = [entry for entry in series if any(methods[m].get(entry[0]) for m in names)] or series[:1]
        width = 0.8 / len(present)
        for position, (kind, key, color, label) in enumerate(present):
            figures = [methods[m].get(kind) or {} for m in names]
            values = [f.get(key) for f in figures]
            heights = [v if v is not None else 0.0 for v in values]
            bounds = [f.get("ci95") or (h, h) for h, f in zip(heights, figures)]
            errors = [[max(h - low, 0.0) for h, (low, _) in zip(heights, bounds)],  # an interval that does not
                      [max(high - h, 0.0) for h, (_, high) in zip(heights, bounds)]]  # hold the value draws none
            offsets = [i + (position - (len(present) - 1) / 2) * width for i in range(len(names))]
            bars = axis.bar(offsets, heights, width=width, color=color, label=label, yerr=errors, capsize=3,
                            error_kw={"elinewidth": 0.8})
            for bar, value in zip(bars, values):
                axis.annotate(with_interval(value), (bar.get_x() + bar.get_width() / 2, 1), ha="center", va="bottom",
                              fontsize=7)
        axis.set_xticks(range(len(names)), names)
        axis.set_ylim(0, 105)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
        if len(present) > 1:
            axis.legend(fontsize=7, loc="upper right")
    figure.text(0.5, 0.01, "bars: 95% intervals", ha="center", fontsize=7)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(path)


def _plot_drift_curves(drift: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> None:
    figure = agg_figure(5.5, 3.6)
    axis = figure.add_subplot(1, 1, 1)
    for method, points in drift.items():
        axis.plot([s for s, _ in points], [d for _, d in points], marker="o", markersize=3, label=method)
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("fine-tuning step")
    axis.set_ylabel("alignment drift")
    axis.set_title("Harmful embedding drift during fine-tuning", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
