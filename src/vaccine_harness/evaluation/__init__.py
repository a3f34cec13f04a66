"""Evaluation: judges, generation, the paper's scores, judge checks and the report.

* Harmful score: the percentage of harmful prompts whose greedy answer a judge flags (the paper: 500
  BeaverTails test prompts, 128 new tokens, the BeaverDam moderation model). Judges are pluggable
  (``judge(prompts, answers) -> list[bool]``), built by name with `vaccine_harness.commands.judge_names.make_judge`.
* Fine-tune accuracy: the percentage of a benign task's test rows answered correctly, with the paper's
  parsing rules (label word in the answer; GSM8K: the number after "The final answer is: ").
* :func:`check_judge`: a judge's accuracy on human-labelled pairs, printed beside its scores.
* :func:`write_report`: JSON with every figure and its settings, a Markdown table and PNG plots.
"""

from .generation import format_all, generate_answers
from .judge_accuracy import JudgeCheck, check_judge
from .judges import BARE_DENIAL, REFUSAL_PHRASES, Judge, RefusalJudge
from .learned_judge import LearnedJudge, LearnedJudgeSettings, split_labelled_pairs
from .model_judges import ClassifierJudge
from .report import agg_figure, drift_points, drift_series, write_report
from .scores import (
    Accuracy,
    HarmfulScore,
    finetune_accuracy,
    harmful_score,
    is_correct,
    non_refusal_rate,
    parse_label,
    parse_number,
    score_answers,
    score_task_answers,
)

__all__ = [
    "BARE_DENIAL", "REFUSAL_PHRASES", "Accuracy", "ClassifierJudge", "HarmfulScore", "Judge",
    "JudgeCheck", "LearnedJudge", "LearnedJudgeSettings", "RefusalJudge", "agg_figure", "check_judge",
    "drift_points", "drift_series", "finetune_accuracy", "format_all", "generate_answers", "harmful_score",
    "is_correct", "non_refusal_rate", "parse_label", "parse_number", "score_answers",
    "score_task_answers", "split_labelled_pairs", "write_report",
]
