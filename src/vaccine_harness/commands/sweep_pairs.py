"""The sweep's arms against a baseline arm (SFT) on the same prompts.

Two arms of one cell are judged on the same prompts, so a difference of a few points is decided by the prompts
flagged for one arm alone, not by two independent intervals: per cell a paired interval and the exact McNemar
test; for the sweep's targets, the worst case and the mean over the cells, intervals that resample the prompts
once for every cell (the cells share their prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from vaccine_trainer.commands.common import logger
from vaccine_trainer.markdown import markdown_table, with_interval

Verdicts = Mapping[str, bool]  # prompt (a sweep keys it by its prompt_id) -> harmful
CellKey = tuple[int, float, float, float, str]  # seed, harmful ratio, learning rate, epochs, method


def cell_key(row: Mapping[str, Any], method: str | None = None) -> CellKey:
    """The key of a sweep row (or of the same cell's `method` arm) in the verdicts."""
    return (row["seed"], row["harmful_ratio"], row["learning_rate"], row["epochs"], method or row["method"])


def _discordant(mine: Sequence[bool], theirs: Sequence[bool]) -> tuple[int, int]:
    """(prompts flagged for the baseline alone, for the arm alone)."""
    return (sum(b and not a for a, b in zip(mine, theirs)), sum(a and not b for a, b in zip(mine, theirs)))


def _aligned(mine: Verdicts | None, theirs: Verdicts | None) -> tuple[list[bool], list[bool]] | None:
    """Both arms' verdicts in one order of the prompts whatever the order they were read in (the bootstrap draws
    by position), or None unless both judged the same prompts."""
    if not mine or not theirs or mine.keys() != theirs.keys():
        return None
    prompts = sorted(theirs)
    return [mine[prompt] for prompt in prompts], [theirs[prompt] for prompt in prompts]


def paired_cells(rows: Sequence[Mapping[str, Any]], verdicts: Mapping[CellKey, Verdicts],
                 baseline: str = "sft") -> list[dict[str, Any]]:
    """Per cell and arm other than `baseline`: its harmful score minus the baseline's on the same prompts, in
    points, with a 95% paired bootstrap interval, the discordant prompts and the exact McNemar p-value."""
    from ..evaluation.intervals import exact_mcnemar, paired_difference

    result = []
    for row in rows:
        pair = _aligned(verdicts.get(cell_key(row)), verdicts.get(cell_key(row, baseline)))
        if row["method"] == baseline or pair is None:
            continue
        difference, low, high = paired_difference(*pair)
        only_baseline, only_method = _discordant(*pair)
        result.append({"seed": row["seed"], "harmful_ratio": row["harmful_ratio"],
                       "learning_rate": row["learning_rate"], "epochs": row["epochs"], "method": row["method"],
                       "baseline": baseline, "difference": 100 * difference, "ci95": [100 * low, 100 * high],
                       "prompts": len(pair[0]), "only_baseline": only_baseline, "only_method": only_method,
                       "mcnemar_p": exact_mcnemar(only_baseline, only_method)})
    return result


def paired_targets(rows: Sequence[Mapping[str, Any]], verdicts: Mapping[CellKey, Verdicts],
                   guard: Callable[[Mapping[str, Any]], bool], baseline: str = "sft") -> list[dict[str, Any]]:
    """Per (seed, p, arm other than `baseline`): the sweep's two targets as differences from the baseline, in
    points, both over the settings both arms finished. The worst case: the highest harmful score among the arm's
    guarded cells minus the baseline's; the mean: the arm's score minus the baseline's; each with a 95% interval
    from one resampling of the prompts shared by every cell; beside them the discordant prompts summed over those
    cells (no test of the sum: the cells share their prompts, so its (cell, prompt) pairs are not independent)."""
    from ..evaluation.intervals import paired_difference, worst_case_difference

    groups: dict[tuple[int, float, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if cell_key(row) in verdicts:
            groups.setdefault((row["seed"], row["harmful_ratio"], row["method"]), []).append(row)
    result = []
    for (seed, ratio, method), cells in sorted(groups.items()):
        theirs = groups.get((seed, ratio, baseline), [])
        if method == baseline or not theirs:
            continue
        prompts = sorted(verdicts[cell_key(theirs[0])])  # one order, as in `_aligned`
        if any(verdicts[cell_key(row)].keys() != set(prompts) for row in [*cells, *theirs]):
            logger().warning(f"sweep: seed {seed}, p {ratio:g}: the cells of {method} and {baseline} were not all "
                             "judged on the same prompts; no paired worst case or mean for them.")
            continue

        def matrix(selected: Sequence[Mapping[str, Any]]) -> np.ndarray:
            return np.array([[verdicts[cell_key(row)][prompt] for prompt in prompts] for row in selected], dtype=bool)

        entry: dict[str, Any] = {"seed": seed, "harmful_ratio": ratio, "method": method, "baseline": baseline,
                                 "prompts": len(prompts)}
        # Both targets over the settings both arms finished: while a sweep runs, a worst case over one arm's
        # settings against one over the other's would compare different attackers.
        by_setting = {(r["learning_rate"], r["epochs"]): r for r in theirs}
        common = [r for r in cells if (r["learning_rate"], r["epochs"]) in by_setting]
        common_theirs = [by_setting[r["learning_rate"], r["epochs"]] for r in common]
        mine_guarded, theirs_guarded = [r for r in common if guard(r)], [r for r in common_theirs if guard(r)]
        if mine_guarded and theirs_guarded:
            point, low, high = worst_case_difference(matrix(mine_guarded), matrix(theirs_guarded))
            entry.update(worst_difference=100 * point, worst_ci95=[100 * low, 100 * high])
        if common:
            mine, base = matrix(common), matrix(common_theirs)
            point, low, high = paired_difference(mine.mean(axis=0), base.mean(axis=0))
            only_baseline, only_method = _discordant(mine.ravel().tolist(), base.ravel().tolist())
            entry.update(mean_difference=100 * point, mean_ci95=[100 * low, 100 * high], common_cells=len(common),
                         only_baseline=only_baseline, only_method=only_method)
        result.append(entry)
    return result


def paired_markdown(cells: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> list[str]:
    """The summary's section: the targets as paired differences, then every cell's."""
    if not cells and not targets:
        return []
    baseline = (cells or targets)[0]["baseline"]
    lines = [f"## Against {baseline}, on the same prompts", "",
             f"Each arm's harmful score minus {baseline}'s in the same cell, in points, with a 95% interval that "
             "resamples the prompts (paired: the prompts flagged for both arms or for neither say nothing about "
             f"the difference); the prompts flagged for {baseline} alone and for the arm alone, and the exact "
             "McNemar p-value of that split." + (
                 " The next two columns are over the settings both arms finished (Cells): worst case, the highest "
                 "score among each arm's guarded cells; mean, the arm's score minus the baseline's; both intervals "
                 "resample the prompts once for every cell, as the cells share their prompts (which is also why the "
                 "discordant prompts summed over the cells get no test: those pairs are not independent)."
                 if targets else ""), ""]
    if targets:  # absent where the verdicts per prompt are not all at hand (e.g. summaries combined)
        header = ["Seed", "p", "Method", f"Worst case − {baseline}'s (points)", f"Mean − {baseline}'s (points)",
                  "Cells", f"{baseline} only / method only, summed"]
        body = [[str(entry["seed"]), f"{entry['harmful_ratio']:g}", entry["method"],
                 with_interval(entry.get("worst_difference"), entry.get("worst_ci95"), signed=True),
                 with_interval(entry.get("mean_difference"), entry.get("mean_ci95"), signed=True),
                 str(entry.get("common_cells", "–")), _split(entry)] for entry in targets]
        lines += [*markdown_table(header, body, numeric_from=0, text_columns=(2,)), ""]
    header = ["Seed", "p", "Method", "lr", "Epochs", "Difference (points)", f"{baseline} only / method only",
              "McNemar p"]
    body = [[str(entry["seed"]), f"{entry['harmful_ratio']:g}", entry["method"], f"{entry['learning_rate']:g}",
             f"{entry['epochs']:g}", with_interval(entry["difference"], entry["ci95"], signed=True), _split(entry),
             _p(entry)] for entry in cells]
    return [*lines, *markdown_table(header, body, numeric_from=0, text_columns=(2,)), ""]


def _split(entry: Mapping[str, Any]) -> str:
    return f"{entry['only_baseline']} / {entry['only_method']}" if "only_baseline" in entry else "–"


def _p(entry: Mapping[str, Any]) -> str:
    return f"{entry['mcnemar_p']:.2f}" if "mcnemar_p" in entry else "–"


__all__ = ["cell_key", "paired_cells", "paired_markdown", "paired_targets"]
