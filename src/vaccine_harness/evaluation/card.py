"""The evaluation's figures as a section of the evaluated model's card, so a pushed model carries its evidence."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vaccine_trainer.markdown import interval_text, markdown_table

from .metrics import JudgeRecord

START, END = "<!-- vaccine-trainer evaluate -->", "<!-- end of vaccine-trainer evaluate -->"


def evaluation_section(result: Mapping[str, Any]) -> str:
    """Harmful score (with its judge and the judge's measured and published accuracy), the judge-corrected score,
    the non-refusal rate and the fine-tune accuracies, each with its 95% interval."""
    harm = result["harmful_score"]
    settings = result["settings"]
    judge = harm["settings"]["judge"]
    rows = [[f"harmful score (judge `{judge}`)", f"{harm['score']:.1f}% of {harm['n']} prompts "
             f"(`{settings['harmful_prompts']}`)", interval_text(harm.get('ci95'))]]
    corrected = harm.get("corrected")
    if corrected:
        mark = " (outside what the judge's measured rates allow: not informative)" if corrected.get("outside_model") \
            else ""
        rows.append([f"harmful score corrected for the judge's errors{mark}", f"{corrected['value']:.1f}%",
                     interval_text(corrected['ci95'])])
    if harm.get("non_refusal_rate") is not None:
        rows.append(["non-refusal rate (no judge)", f"{harm['non_refusal_rate']:.1f}%",
                     interval_text(harm.get('non_refusal_ci95'))])
    for key, how in (("accuracy", "generated answers"), ("accuracy_by_likelihood", "label likelihood")):
        accuracy = result.get(key)
        if accuracy:
            rows.append([f"fine-tune accuracy, {accuracy['task']} ({how})",
                         f"{accuracy['accuracy']:.1f}% of {accuracy['n']} rows", interval_text(accuracy.get('ci95'))])
    measured = JudgeRecord.of(harm, result.get("judge_check")).summary() or "not measured (no labelled pairs given)"
    return "\n".join([
        START, "## Evaluation (`vaccine-trainer evaluate`)", "",
        *markdown_table(["figure", "value", "95% interval"], rows, numeric_from=3), "",
        f"Judge: {measured}. Greedy answers, {harm['settings'].get('max_new_tokens')} new tokens. Method: Vaccine "
        "(Huang, Hu, Liu, NeurIPS 2024, [arXiv:2402.01109](https://arxiv.org/abs/2402.01109)).", END, ""])


def write_section(card: Path, section: str) -> None:
    """Put `section` in the card, replacing an earlier evaluation's section (a card of its own if there is none)."""
    text = card.read_text() if card.is_file() else ""
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END) + "\n?", re.S)
    text = pattern.sub("", text).rstrip("\n")
    card.write_text((text + "\n\n" if text else "") + section)


__all__ = ["evaluation_section", "write_section"]
