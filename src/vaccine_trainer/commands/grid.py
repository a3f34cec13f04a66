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
from typing import Any

from ..drift_measures import DRIFT_MEASURES
from .common import PROG, logger
from .pipeline import (
    DEFAULT_RHO,
    METHODS,
    PHASE_MARKER,
    PipelineArguments,
    arm_results,
    resolve_model,
    run_pipeline,
)

SUMMARY_DIR = "summary"
RECOMPUTED_DRIFT_FILE = "alignment_drift_recomputed.json"
"""Written into a stage-2 folder by `experiments/drift_fraction.py`: the final drift fraction, median token
drift and drift excluding first token, recomputed from the saved adapter for an arm fine-tuned before those
were logged."""


@dataclass
class GridArguments:
    """The axes of the grid; every other setting is the pipeline's (`PipelineArguments`).

    Parameters:
        seeds (`str`, defaults to `"42"`): comma-separated seeds (data samples and training).
        harmful_ratios (`str`, defaults to `"0,0.1,0.2"`): comma-separated harmful fractions p of stage 2.
        summary_only (`bool`, defaults to `False`): write the summary of the finished cells and run nothing.
    """

    seeds: str = field(default="42", metadata={"help": "Comma-separated seeds, e.g. 42,43."})
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
    pooled = pooled_differences(*collect_verdicts(root, seeds, ratios))
    paths = write_summary(root / SUMMARY_DIR, rows, settings=settings, missing=missing, pooled=pooled)
    print(f"{PROG} grid: summary in {paths['markdown']}")
    return paths


def collect_rows(root: Path, seeds: Sequence[int],
                 ratios: Sequence[float]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (seed, p, arm) for every arm evaluated in a cell, and the cells with none yet.

    Rows are read from the arms' own phases, not from the cell's report: a report lists the methods of the
    last call there, while separate calls (one process per method, a rho sweep beside rho 2) fill one cell.
    """
    from ..evaluation import drift_points

    rows, missing = [], []
    for seed in seeds:
        for ratio in ratios:
            cell = cell_dir(root, seed, ratio)
            arms = evaluated_arms(cell)
            if not arms:
                logger().warning(f"grid: {cell} has no evaluated arm yet, left out of the summary.")
                missing.append(f"seed {seed}, p = {ratio:g}")
            for label, folder in arms:
                figures = arm_results(folder)
                harm, acc = figures.get("harmful_score") or {}, figures.get("accuracy") or {}
                likelihood = figures.get("likelihood") or {}
                state = folder / "finetune" / "trainer_state.json"
                drift = drift_points(json.loads(state.read_text())["log_history"]) if state.is_file() else []
                final, recomputed = final_drift(drift, folder / "finetune" / RECOMPUTED_DRIFT_FILE)
                rows.append({"seed": seed, "harmful_ratio": ratio, "method": label,
                             "harmful_score": harm.get("score"), "num_prompts": harm.get("n"),
                             "non_refusal_rate": harm.get("non_refusal_rate"),
                             "judge": (harm.get("settings") or {}).get("judge"),
                             "judge_accuracy": (harm.get("settings") or {}).get("judge_accuracy"),
                             "accuracy": acc.get("accuracy"), "num_task_samples": acc.get("n"),
                             **{key: likelihood.get(key) for key in LIKELIHOOD_KEYS},
                             **{f"final_{name}": value for name, value in final.items()},
                             "drift_recomputed": recomputed, "drift": drift,
                             "wall_time_s": phase_wall_times(root / f"seed{seed}" / folder.name / "align", folder)})
    return rows, missing


def collect_verdicts(root: Path, seeds: Sequence[int], ratios: Sequence[float]) -> tuple[dict, dict]:
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
    both, with an interval that resamples prompts within seeds, and corrected for the judge's measured errors."""
    from ..evaluation.intervals import stratified_paired_difference

    groups: dict[tuple[str, float], list[tuple[int, list[bool], list[bool]]]] = {}
    for (seed, ratio, method), mine in verdicts.items():
        theirs = verdicts.get((seed, ratio, baseline))
        prompts = [prompt for prompt in (theirs or {}) if prompt in mine]
        if method != baseline and prompts:
            groups.setdefault((method, ratio), []).append(
                (seed, [mine[p] for p in prompts], [theirs[p] for p in prompts]))
    pooled = []
    for (method, ratio), pairs in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        judge_errors = next((errors.get((seed, ratio, baseline)) for seed, _, _ in pairs
                             if errors.get((seed, ratio, baseline)) is not None), None)
        result = stratified_paired_difference([(a, b) for _, a, b in pairs], judge_errors)
        pooled.append({"method": method, "baseline": baseline, "harmful_ratio": ratio,
                       "seeds": [seed for seed, _, _ in pairs], **result})
    return pooled


def final_drift(drift: Sequence[Mapping[str, Any]], recomputed_file: Path) -> tuple[dict[str, Any], list[str]]:
    """The last logged drift and its other measures (`DRIFT_MEASURES`), and the names of those taken from the
    recomputed file because the stage-2 log predates them (older cells logged the absolute drift only)."""
    last = drift[-1] if drift else {}
    final = {name: last.get(name) for name in ("drift", *DRIFT_MEASURES)}
    absent = [name for name, value in final.items() if value is None]
    if not absent or not recomputed_file.is_file():
        return final, []
    stored = json.loads(recomputed_file.read_text())
    taken = [name for name in absent if stored.get(name) is not None]
    return final | {name: stored[name] for name in taken}, taken


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


LIKELIHOOD_KEYS = ("harmful_answer_nll", "held_out_alignment_loss", "refusal_preference")


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each figure, per (method, p), in first-seen order."""
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["harmful_ratio"]), []).append(row)
    summary = []
    for (method, ratio), members in groups.items():
        entry: dict[str, Any] = {"method": method, "harmful_ratio": ratio, "seeds": [m["seed"] for m in members],
                                 "num_prompts": members[0]["num_prompts"],
                                 "num_task_samples": members[0]["num_task_samples"]}
        for key in ("harmful_score", "non_refusal_rate", "accuracy", *DRIFT_KEYS, *LIKELIHOOD_KEYS):
            values = [m.get(key) for m in members if m.get(key) is not None]
            entry[key] = statistics.fmean(values) if values else None
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
            entry[f"{key}_num_seeds"] = len(values)  # older cells may predate a key: the mean is over fewer seeds
        summary.append(entry)
    return summary


DRIFT_KEYS = tuple(f"final_{name}" for name in ("drift", *DRIFT_MEASURES))  # as `collect_rows` names them
PAIRED_KEYS = ("harmful_score", "non_refusal_rate", "accuracy", "refusal_preference", *DRIFT_KEYS)
FORMATS = dict.fromkeys(DRIFT_KEYS, ".2e")
"""How each figure is printed in summary.md; one decimal by default."""


def paired_differences(rows: Sequence[Mapping[str, Any]], baseline: str = "sft") -> list[dict[str, Any]]:
    """Method minus `baseline` on each seed that has both, per (method, p): the paper's comparison.

    Pairing by seed removes what the seed changes for every arm alike (data drawn, initialisation), so
    the differences' spread is the honest error bar of "Vaccine is lower than SFT".
    """
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
        for key in PAIRED_KEYS:
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
    if len(seeds) < len(entry["seeds"]):  # older cells predate the key: name the seeds the figure comes from
        per_seed = ", ".join(f"seed {seed}: {value:+{spec}}" for seed, value in zip(seeds, values))
    else:
        per_seed = ", ".join(f"{value:+{spec}}" for value in values)
    return f"{_cell(entry[f'{key}_mean'], entry[f'{key}_std'], spec)} ({per_seed})"


def _cell(mean: float | None, std: float | None, spec: str = ".1f") -> str:
    if mean is None:
        return "–"
    return f"{mean:{spec}}" + (f" ± {std:{spec}}" if std is not None else "")


def _rate(percent: float | None, n: int | None) -> str:
    """A rate of n items with its Wilson interval, e.g. `31.0 [25.0, 37.7]`."""
    from ..evaluation.intervals import wilson_percent

    if percent is None:
        return "–"
    if not n:
        return f"{percent:.1f}"
    low, high = wilson_percent(round(percent * n / 100), n)
    return f"{percent:.1f} [{low:.1f}, {high:.1f}]"


def _summary_cell(entry: Mapping[str, Any], key: str, spec: str = ".1f") -> str:
    """A mean over seeds, saying over how many when some of the group's seeds lack the figure."""
    text = _cell(entry[key], entry[f"{key}_std"], spec)
    counted, seeds = entry[f"{key}_num_seeds"], len(entry["seeds"])
    return text + (f" ({counted} of {seeds} seeds)" if 0 < counted < seeds else "")


def write_summary(output_dir: Path, rows: Sequence[Mapping[str, Any]], *,
                  settings: Mapping[str, Any] | None = None, missing: Sequence[str] = (),
                  pooled: Sequence[Mapping[str, Any]] = ()) -> dict[str, Path]:
    """`summary.json`, `summary.md` and two plots: figures against p, and drift during stage 2."""
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    paired = paired_differences(rows)
    paths = {"json": output_dir / "summary.json", "markdown": output_dir / "summary.md",
             "scores_plot": output_dir / "scores_vs_ratio.png", "drift_plot": output_dir / "drift.png"}
    _plot_against_ratio(summary, paths["scores_plot"])
    _plot_drift(rows, paths["drift_plot"])
    paths["json"].write_text(json.dumps({"settings": dict(settings or {}), "summary": summary, "paired": paired,
                                         "pooled_paired": list(pooled), "rows": rows, "missing_cells": list(missing)},
                                        indent=1, default=str) + "\n")
    seeds = sorted({row["seed"] for row in rows})
    lines = ["# Vaccine: harmful fine-tuning over seeds and harmful ratios", "",
             f"Mean ± standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}).", ""]
    if missing:
        lines += [f"**Not finished, left out:** {'; '.join(missing)}.", ""]
    header = ("| Method | p | Harmful score (%) ↓ | Non-refusal rate (%) ↓ | Fine-tune accuracy (%) ↑ "
              "| Drift at the last step ↓ | Drift fraction ↓ | Median token drift ↓ | Drift excluding first token ↓ "
              "| Prompts / rows |")
    lines += [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for entry in summary:
        lines.append(f"| {entry['method']} | {entry['harmful_ratio']:g} "
                     + "".join(f"| {_summary_cell(entry, key, FORMATS.get(key, '.1f'))} "
                               for key in ("harmful_score", "non_refusal_rate", "accuracy", *DRIFT_KEYS))
                     + f"| {entry['num_prompts']} / {entry['num_task_samples']} |")
    recomputed = [row for row in rows if row.get("drift_recomputed")]
    if recomputed:
        names = sorted({name.replace("_", " ") for row in recomputed for name in row["drift_recomputed"]})
        lines += ["", f"Recomputed from the saved stage-2 adapter for {len(recomputed)} arm(s) fine-tuned before "
                  f"these were logged (`experiments/drift_fraction.py`): {', '.join(names)}."]
    judges = sorted({f"{row['judge']} ({row['judge_accuracy'].split(': ', 1)[-1]})" if row.get("judge_accuracy")
                     else str(row.get("judge")) for row in rows})
    lines += ["", f"Judge of the harmful score (its measured accuracy): {'; '.join(judges)}.", ""]
    if any(entry.get("refusal_preference") is not None for entry in summary):
        lines += ["Judge-free metrics (teacher forcing):", "",
                  "| Method | p | Harmful-answer NLL ↑ | Held-out alignment loss ↓ | Refusal preference (%) ↑ |",
                  "|---|---:|---:|---:|---:|"]
        for entry in summary:
            lines.append(f"| {entry['method']} | {entry['harmful_ratio']:g} "
                         f"| {_summary_cell(entry, 'harmful_answer_nll', '.3f')} "
                         f"| {_summary_cell(entry, 'held_out_alignment_loss', '.3f')} "
                         f"| {_summary_cell(entry, 'refusal_preference')} |")
        lines.append("")
    if paired:
        lines += ["Paired differences, method − SFT on the same seed: mean ± sd (each seed's difference):", "",
                  "| Method | p | Seeds | Harmful score (points) | Non-refusal rate (points) | Accuracy (points) "
                  "| Refusal preference (points) | Drift at the last step | Drift fraction | Median token drift "
                  "| Drift excluding first token |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for entry in paired:
            lines.append(f"| {entry['method']} | {entry['harmful_ratio']:g} | {', '.join(map(str, entry['seeds']))} "
                         + "".join(f"| {_paired_cell(entry, key, FORMATS.get(key, '.1f'))} "
                                   for key in PAIRED_KEYS) + "|")
        lines.append("")
    if pooled:
        lines += ["Harmful score minus SFT's on the same prompts, mean over seeds, with a 95% interval that resamples "
                  "the prompts within each seed (the seeds are kept), and corrected for the judge's measured "
                  "sensitivity and specificity (the difference divided by Youden's index; its interval also "
                  "resamples the judge's labelled pairs; valid if the judge errs alike on both arms):", "",
                  "| Method | p | Seeds | Difference (points) | Corrected for the judge's errors (points) |",
                  "|---|---:|---|---:|---:|"]
        for entry in pooled:
            corrected = entry.get("corrected") or {}
            low, high = entry["ci95"]
            cell = f"{entry['difference']:+.1f} [{low:+.1f}, {high:+.1f}]"
            if corrected:
                c_low, c_high = corrected["ci95"]
                corrected_cell = f"{corrected['value']:+.1f} [{c_low:+.1f}, {c_high:+.1f}]"
            else:
                corrected_cell = "–"
            lines.append(f"| {entry['method']} | {entry['harmful_ratio']:g} | {', '.join(map(str, entry['seeds']))} "
                         f"| {cell} | {corrected_cell} |")
        lines.append("")
    lines += ["Per seed, each rate with its 95% Wilson interval:", "",
              "| Seed | Method | p | Harmful score (%) | Accuracy (%) | Drift | Wall time (s) |",
              "|---:|---|---:|---:|---:|---:|---|"]
    for row in rows:
        walls = ", ".join(f"{phase} {seconds:.0f}" for phase, seconds in row["wall_time_s"].items())
        lines.append(f"| {row['seed']} | {row['method']} | {row['harmful_ratio']:g} "
                     f"| {_rate(row['harmful_score'], row['num_prompts'])} "
                     f"| {_rate(row['accuracy'], row['num_task_samples'])} "
                     f"| {_cell(row['final_drift'], None, FORMATS['final_drift'])} | {walls} |")
    lines += ["", f"![Harmful score and accuracy against p]({paths['scores_plot'].name})", "",
              f"![Drift during stage 2]({paths['drift_plot'].name})", ""]
    if settings:
        lines += ["## Settings", "", "```json", json.dumps(dict(settings), indent=1, default=str), "```", ""]
    paths["markdown"].write_text("\n".join(lines))
    return paths


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


def _plot_drift(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
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

    args, grid_args = TrlParser((PipelineArguments, GridArguments), prog=f"{PROG} grid").parse_args_and_config(argv)
    run_grid(args, grid_args)
    return 0
