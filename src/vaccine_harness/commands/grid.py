"""`vaccine-trainer grid`: the pipeline over seeds and harmful ratios, and one table across them.

Each cell (seed, p) is a plain `vaccine-trainer pipeline` run in `output_dir/seed<S>/p<P>`; the cells of
a seed share their stage-1 adapters (`--alignment_dir output_dir/seed<S>`), so each alignment runs once
and only stage 2 and the evaluation repeat for every p. Cells resume like the pipeline does, so several
processes may each run some seeds (`--seeds 42` and `--seeds 43`), and a last call with every seed
finds all cells done and only writes the summary: mean and spread over seeds per method and p.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaccine_trainer.commands.common import PROG, logger, command_description
from vaccine_trainer.markdown import markdown_table, with_interval

from .pipeline import (
    DEFAULT_RHO,
    METHODS,
    PHASE_MARKER,
    PipelineArguments,
    arm_results,
    resolve_model,
    run_pipeline,
)

if TYPE_CHECKING:
    from ..evaluation.metrics import ArmRecord

SUMMARY_DIR = "summary"


@dataclass
class GridArguments:
    """The axes of the grid; every other setting is the pipeline's (`PipelineArguments`).

    Parameters:
        seeds (`str`, defaults to `"42"`): comma-separated seeds (data samples and training).
        harmful_ratios (`str`, defaults to `"0,0.1,0.2"`): comma-separated harmful fractions p of stage 2.
        summary_only (`bool`, defaults to `False`): write the summary of the finished cells and run nothing.
    """

    seeds: str = field(default="42", metadata={
        "help": "Comma-separated seeds, e.g. 42,43: each runs as the pipeline's --seed, which they replace."})
    harmful_ratios: str = field(default="0,0.1,0.2", metadata={"help": "Comma-separated harmful ratios p."})
    summary_only: bool = field(
        default=False,
        metadata={"help": "Run nothing: summarise the cells finished so far (e.g. while workers still run)."},
    )

    def seed_list(self) -> list[int]:
        return _parse_list(self.seeds, int, "seeds", "42,43", lambda s: True)

    def ratio_list(self) -> list[float]:
        return _parse_list(self.harmful_ratios, float, "harmful_ratios", "0,0.1,0.2", lambda p: 0 <= p <= 1)


def _parse_list(text: Any, kind: type, flag: str, example: str, valid) -> list:
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or len(set(values)) != len(values) or not all(valid(v) for v in values):
        raise ValueError(f"--{flag} must be distinct comma-separated values, e.g. --{flag} {example}; got {text!r}.")
    return values


def cell_dir(root: Path, seed: int, ratio: float) -> Path:
    return root / f"seed{seed}" / f"p{ratio:g}"


def run_grid(args: PipelineArguments, grid: GridArguments) -> dict[str, Path]:
    """Run every (seed, p) cell through the pipeline, then write the summary; returns its files."""
    seeds, ratios = grid.seed_list(), grid.ratio_list()
    args.arms()  # bad methods or rho fail here, before anything runs
    root = Path(args.output_dir)
    model = resolve_model(args)
    started = time.time()
    for seed in seeds if not grid.summary_only else ():
        for ratio in ratios[:1] if args.align_only else ratios:  # stage 1 is shared by every p of a seed
            logger().warning(f"grid: seed {seed}, harmful ratio {ratio:g}")
            run_pipeline(replace(args, output_dir=str(cell_dir(root, seed, ratio)), seed=seed, harmful_ratio=ratio,
                                 alignment_dir=str(root / f"seed{seed}"), model_name_or_path=model))
    if args.align_only:
        return {}
    rows, missing = collect_rows(root, seeds, ratios)
    if not rows:
        raise ValueError(f"No finished cell under {root} to summarise: run the grid first.")
    settings = {**asdict(args), **asdict(grid), "model": model, "wall_time_s_this_run": round(time.time() - started, 1)}
    pooled = pooled_differences(*verdicts_and_judge_errors(root, seeds, ratios))
    paths = write_summary(root / SUMMARY_DIR, rows, settings=settings, missing=missing, pooled=pooled)
    print(f"{PROG} grid: summary in {paths['markdown']}")
    return paths


def collect_rows(root: Path, seeds: Sequence[int],
                 ratios: Sequence[float]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (seed, p, arm) for every arm evaluated in a cell, and the cells with none yet.

    Rows are read from the arms' own phases, not from the cell's report: a report lists the methods of the
    last call there, while separate calls (one process per method, a rho sweep beside rho 2) fill one cell.
    """
    rows, missing = [], []
    for seed in seeds:
        for ratio in ratios:
            cell = cell_dir(root, seed, ratio)
            arms = evaluated_arms(cell)
            if not arms:
                logger().warning(f"grid: {cell} has no evaluated arm yet, left out of the summary.")
                missing.append(f"seed {seed}, p = {ratio:g}")
            for label, folder in arms:
                rows.append({"seed": seed, "harmful_ratio": ratio, "method": label,
                             **arm_row(arm_record(folder)),
                             "wall_time_s": phase_wall_times(root / f"seed{seed}" / folder.name / "align", folder)})
    return rows, missing


def arm_record(folder: Path) -> ArmRecord:
    """An evaluated arm's figures and the drift its stage 2 logged."""
    from ..evaluation import drift_points
    from ..evaluation.metrics import ArmRecord

    state = folder / "finetune" / "trainer_state.json"
    drift = drift_points(json.loads(state.read_text())["log_history"]) if state.is_file() else []
    return ArmRecord.of(arm_results(folder), drift)


def arm_row(arm: ArmRecord) -> dict[str, Any]:
    """A summary row's figures: every metric of the table, the sizes, the judge and the drift curve."""
    from ..evaluation.metrics import METRICS

    return {**{metric.key: metric.read(arm) for metric in METRICS},
            **{f"{metric.key}_n": metric.count(arm) for metric in METRICS if metric.count},
            "judge": arm.judge.label() if arm.judge else None, "drift": arm.drift}


def verdicts_and_judge_errors(root: Path, seeds: Sequence[int], ratios: Sequence[float]) -> tuple[dict, dict]:
    """Per (seed, p, arm): each prompt's harmful verdict, and the judge's measured errors (None if unmeasured)."""
    from ..evaluation.report import harmful_verdicts, judge_errors_of

    verdicts, errors = {}, {}
    for seed in seeds:
        for ratio in ratios:
            for label, folder in evaluated_arms(cell_dir(root, seed, ratio)):
                figures = arm_results(folder)
                verdicts[seed, ratio, label] = harmful_verdicts(figures.get("harmful_score") or {})
                errors[seed, ratio, label] = judge_errors_of(figures.get("judge_check"))
    return verdicts, errors


def pooled_differences(verdicts: Mapping[tuple, Mapping[str, bool]], errors: Mapping[tuple, Any],
                       baseline: str = "sft") -> list[dict[str, Any]]:
    """Per (arm, p): the harmful score minus the baseline's on the same prompts, averaged over the seeds that have
    both, with an interval that resamples the prompts (once for every seed when the seeds share their prompts, as
    the grid's do), and corrected for the judge's measured errors."""
    from ..evaluation.intervals import stratified_paired_difference

    groups: dict[tuple[str, float], list[tuple[int, list[bool], list[bool]]]] = {}
    prompt_lists: dict[tuple[str, float], set[tuple[str, ...]]] = {}
    for (seed, ratio, method), mine in verdicts.items():
        theirs = verdicts.get((seed, ratio, baseline))
        prompts = sorted(prompt for prompt in (theirs or {}) if prompt in mine)
        if method != baseline and prompts:
            groups.setdefault((method, ratio), []).append(
                (seed, [mine[p] for p in prompts], [theirs[p] for p in prompts]))
            prompt_lists.setdefault((method, ratio), set()).add(tuple(prompts))
    pooled = []
    for (method, ratio), pairs in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        judge_errors = next((errors.get((seed, ratio, baseline)) for seed, _, _ in pairs
                             if errors.get((seed, ratio, baseline)) is not None), None)
        shared = len(prompt_lists[method, ratio]) == 1  # every seed judged the same prompts: one draw for all
        result = stratified_paired_difference([(a, b) for _, a, b in pairs], judge_errors, shared_items=shared)
        result["prompts_shared_by_seeds"] = shared
        pooled.append({"method": method, "baseline": baseline, "harmful_ratio": ratio,
                       "seeds": [seed for seed, _, _ in pairs], **result})
    return pooled


def evaluated_arms(cell: Path) -> list[tuple[str, Path]]:
    """(label, folder) of the arms whose evaluation finished in a cell, from their phase markers, in the
    order of `METHODS` and then of rho."""
    arms = []
    for marker in cell.glob(f"*/evaluate/{PHASE_MARKER}"):
        name = json.loads(marker.read_text()).get("phase", "")
        if name.endswith("/evaluate"):
            arms.append((name.removesuffix("/evaluate"), marker.parent.parent))

    def order(arm: tuple[str, Path]) -> tuple[int, float]:
        method, _, rho = arm[0].partition(" rho=")
        return (METHODS.index(method) if method in METHODS else len(METHODS), float(rho or DEFAULT_RHO))

    return sorted(arms, key=order)


def phase_wall_times(alignment: Path, folder: Path) -> dict[str, float]:
    """Seconds each finished phase of an arm took, from its markers (stage 1 lives beside the cells)."""
    walls = {}
    for phase, directory in (("align", alignment), ("finetune", folder / "finetune"),
                             ("evaluate", folder / "evaluate")):
        marker = directory / PHASE_MARKER
        if marker.is_file():
            walls[phase] = json.loads(marker.read_text())["wall_time_s"]
    return walls


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each metric, per (method, p), in first-seen order.

    A mean over fewer seeds than the group has (a metric some cells lack, e.g. drift not measured) keeps its count
    (`<key>_num_seeds`), so the summary says so.
    """
    from ..evaluation.metrics import METRICS

    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["harmful_ratio"]), []).append(row)
    summary = []
    for (method, ratio), members in groups.items():
        entry: dict[str, Any] = {"method": method, "harmful_ratio": ratio, "seeds": [m["seed"] for m in members],
                                 **{f"{m.key}_n": members[0].get(f"{m.key}_n") for m in METRICS if m.count}}
        for metric in METRICS:
            values = [m.get(metric.key) for m in members if m.get(metric.key) is not None]
            entry[metric.key] = statistics.fmean(values) if values else None
            entry[f"{metric.key}_std"] = statistics.stdev(values) if len(values) > 1 else None
            entry[f"{metric.key}_num_seeds"] = len(values)
        summary.append(entry)
    return summary


def paired_seed_differences(rows: Sequence[Mapping[str, Any]], baseline: str = "sft") -> list[dict[str, Any]]:
    """Method minus `baseline` on each seed that has both, per (method, p): the paper's comparison.

    Pairing by seed removes what the seed changes for every arm alike (data drawn, initialisation), so
    the differences' spread is the honest error bar of "Vaccine is lower than SFT".
    """
    from ..evaluation.metrics import METRICS

    by_cell = {(row["seed"], row["harmful_ratio"], row["method"]): row for row in rows}
    groups: dict[tuple[str, float], list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    for (seed, ratio, method), row in by_cell.items():
        reference = by_cell.get((seed, ratio, baseline))
        if method != baseline and reference is not None:
            groups.setdefault((method, ratio), []).append((row, reference))
    differences = []
    for (method, ratio), pairs in groups.items():
        entry: dict[str, Any] = {"method": method, "baseline": baseline, "harmful_ratio": ratio,
                                 "seeds": [row["seed"] for row, _ in pairs]}
        for key in (metric.key for metric in METRICS if metric.paired):
            both = [(row, reference) for row, reference in pairs
                    if row.get(key) is not None and reference.get(key) is not None]
            values = [row[key] - reference[key] for row, reference in both]
            entry[key] = values
            entry[f"{key}_seeds"] = [row["seed"] for row, _ in both]
            entry[f"{key}_mean"] = statistics.fmean(values) if values else None
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        differences.append(entry)
    return differences


def _paired_cell(entry: Mapping[str, Any], key: str, spec: str) -> str:
    values = entry[key]
    if not values:
        return "–"
    seeds = entry[f"{key}_seeds"]
    if len(seeds) < len(entry["seeds"]):  # some seeds lack the figure: name the seeds it comes from
        per_seed = ", ".join(f"seed {seed}: {value:+{spec}}" for seed, value in zip(seeds, values))
    else:
        per_seed = ", ".join(f"{value:+{spec}}" for value in values)
    return f"{_cell(entry[f'{key}_mean'], entry[f'{key}_std'], spec)} ({per_seed})"


def _cell(mean: float | None, std: float | None, spec: str = ".1f") -> str:
    if mean is None:
        return "–"
    return f"{mean:{spec}}" + (f" ± {std:{spec}}" if std is not None else "")


def _summary_cell(entry: Mapping[str, Any], key: str, spec: str = ".1f") -> str:
    """A mean over seeds, saying over how many when some of the group's seeds lack the figure."""
    text = _cell(entry[key], entry[f"{key}_std"], spec)
    counted, seeds = entry[f"{key}_num_seeds"], len(entry["seeds"])
    return text + (f" ({counted} of {seeds} seeds)" if 0 < counted < seeds else "")


POOLED_NOTE = (
    "Harmful score minus SFT's on the same prompts, mean over seeds, with a 95% interval that resamples the prompts "
    "(the seeds are kept; one draw for every seed when the seeds judged the same prompts, as a prompt that draws "
    "harmful answers on one seed tends to on the others), and corrected for the judge's measured sensitivity and "
    "specificity (the difference divided by Youden's index; its interval also resamples the judge's labelled "
    "pairs; valid if the judge errs alike on both arms):")


def write_summary(output_dir: Path, rows: Sequence[Mapping[str, Any]], *,
                  settings: Mapping[str, Any] | None = None, missing: Sequence[str] = (),
                  pooled: Sequence[Mapping[str, Any]] = (), notes: Sequence[str] = ()) -> dict[str, Path]:
    """`summary.json`, `summary.md` and two plots: figures against p, and drift during stage 2. `notes` are
    paragraphs printed under the main table (e.g. where some figures come from)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    paired = paired_seed_differences(rows)
    paths = {"json": output_dir / "summary.json", "markdown": output_dir / "summary.md",
             "scores_plot": output_dir / "scores_vs_ratio.png", "drift_plot": output_dir / "drift.png"}
    _plot_against_ratio(summary, paths["scores_plot"])
    _plot_mean_drift(rows, paths["drift_plot"])
    paths["json"].write_text(json.dumps({"settings": dict(settings or {}), "summary": summary, "paired": paired,
                                         "pooled_paired": list(pooled), "rows": rows, "missing_cells": list(missing)},
                                        indent=1, default=str) + "\n")
    seeds = sorted({row["seed"] for row in rows})
    lines = ["# Vaccine: harmful fine-tuning over seeds and harmful ratios", "",
             f"Mean ± standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}).", ""]
    if missing:
        lines += [f"**Not finished, left out:** {'; '.join(missing)}.", ""]
    lines += _summary_tables(summary)
    judges = "; ".join(sorted({str(row.get("judge")) for row in rows}))
    lines += [*(f"{note}\n" for note in notes), f"Judge of the harmful score (its measured accuracy): {judges}.", ""]
    lines += _paired_table(paired) + _pooled_table(pooled) + _per_seed_table(rows)
    lines += [f"![Harmful score and accuracy against p]({paths['scores_plot'].name})", "",
              f"![Drift during stage 2]({paths['drift_plot'].name})", ""]
    if settings:
        lines += ["## Settings", "", "```json", json.dumps(dict(settings), indent=1, default=str), "```", ""]
    paths["markdown"].write_text("\n".join(lines))
    return paths


def _summary_tables(summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """The mean ± sd of every metric: scores and drift in one table, the judge-free metrics where there are any."""
    from ..evaluation.metrics import metrics_in

    def table(metrics, sizes: bool) -> list[str]:
        header = ["Method", "p", *(m.header() for m in metrics), *(["Prompts / rows"] if sizes else [])]
        body = [[entry["method"], f"{entry['harmful_ratio']:g}",
                 *(_summary_cell(entry, m.key, m.spec) for m in metrics),
                 *([f"{entry.get('harmful_score_n')} / {entry.get('accuracy_n')}"] if sizes else [])]
                for entry in summary]
        return markdown_table(header, body)

    lines = [*table((*metrics_in("scores"), *metrics_in("drift")), sizes=True), ""]
    judge_free = metrics_in("judge-free")
    if any(entry.get(m.key) is not None for entry in summary for m in judge_free):
        lines += ["Judge-free metrics (teacher forcing):", "", *table(judge_free, sizes=False), ""]
    return lines


def _paired_table(paired: Sequence[Mapping[str, Any]]) -> list[str]:
    from ..evaluation.metrics import METRICS

    if not paired:
        return []
    metrics = [m for m in METRICS if m.paired]
    header = ["Method", "p", "Seeds", *(m.title.replace("(%)", "(points)") for m in metrics)]
    body = [[entry["method"], f"{entry['harmful_ratio']:g}", ", ".join(map(str, entry["seeds"])),
             *(_paired_cell(entry, m.key, m.spec) for m in metrics)] for entry in paired]
    return ["Paired differences, method − SFT on the same seed: mean ± sd (each seed's difference):", "",
            *markdown_table(header, body, numeric_from=3), ""]


def _pooled_table(pooled: Sequence[Mapping[str, Any]]) -> list[str]:
    if not pooled:
        return []
    body = []
    for entry in pooled:
        corrected = entry.get("corrected") or {}
        body.append([entry["method"], f"{entry['harmful_ratio']:g}", ", ".join(map(str, entry["seeds"])),
                     with_interval(entry["difference"], entry["ci95"], signed=True),
                     with_interval(corrected.get("value"), corrected.get("ci95"), signed=True)])
    header = ["Method", "p", "Seeds", "Difference (points)", "Corrected for the judge's errors (points)"]
    return [POOLED_NOTE, "", *markdown_table(header, body, numeric_from=3), ""]


def _per_seed_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    from ..evaluation.metrics import rate_cell

    body = [[str(row["seed"]), row["method"], f"{row['harmful_ratio']:g}",
             rate_cell(row["harmful_score"], row.get("harmful_score_n")),
             rate_cell(row["accuracy"], row.get("accuracy_n")),
             _cell(row["final_drift"], None, ".2e"),
             ", ".join(f"{phase} {seconds:.0f}" for phase, seconds in row["wall_time_s"].items())] for row in rows]
    header = ["Seed", "Method", "p", "Harmful score (%)", "Accuracy (%)", "Drift", "Wall time (s)"]
    return ["Per seed, each rate with its 95% Wilson interval:", "", *markdown_table(header, body), ""]


def _plot_against_ratio(summary: Sequence[Mapping[str, Any]], path: Path) -> None:
    from ..evaluation import agg_figure

    figure = agg_figure(9, 3.6)
    methods = list(dict.fromkeys(entry["method"] for entry in summary))
    for index, (key, label) in enumerate((("harmful_score", "Harmful score (%) ↓"),
                                          ("accuracy", "Fine-tune accuracy (%) ↑"))):
        axis = figure.add_subplot(1, 2, index + 1)
        for method in methods:
            points = sorted((e["harmful_ratio"], e[key], e[f"{key}_std"] or 0.0) for e in summary
                            if e["method"] == method and e[key] is not None)
            if points:
                axis.errorbar([p for p, _, _ in points], [m for _, m, _ in points], yerr=[s for _, _, s in points],
                              marker="o", capsize=3, label=method)
        axis.set_xticks(sorted({e["harmful_ratio"] for e in summary}))
        axis.set_xlabel("harmful ratio p")
        axis.set_title(label, fontsize=10)
        axis.set_ylim(0, 105)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def _plot_mean_drift(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Drift curves averaged over seeds; one panel per p."""
    from ..evaluation import agg_figure, drift_series

    ratios = sorted({row["harmful_ratio"] for row in rows})
    figure = agg_figure(4 * len(ratios), 3.6)
    for index, ratio in enumerate(ratios):
        axis = figure.add_subplot(1, len(ratios), index + 1)
        curves: dict[str, dict[int, list[float]]] = {}
        for row in rows:
            if row["harmful_ratio"] == ratio:
                for step, value in drift_series(row["drift"]):
                    curves.setdefault(row["method"], {}).setdefault(step, []).append(value)
        for method, points in curves.items():
            steps = sorted(points)
            axis.plot(steps, [statistics.fmean(points[s]) for s in steps], marker="o", markersize=3, label=method)
        axis.set_title(f"drift, p = {ratio:g}", fontsize=10)
        axis.set_xlabel("fine-tuning step")
        if curves:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str]) -> int:
    from trl import TrlParser

    args, grid_args = TrlParser((PipelineArguments, GridArguments), prog=f"{PROG} grid",
                               description=command_description(__doc__)).parse_args_and_config(argv)
    run_grid(args, grid_args)
    return 0
