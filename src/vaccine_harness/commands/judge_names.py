"""Judges by name, as `--judge` and `--second_judge` take them: ``refusal``, ``learned``, ``learned-pair`` or
``<kind>:<model>``.

The names are checked before any model loads (`check_judge_spec`), so a misspelled judge fails at start-up;
`make_judge` then builds the judge, importing a model-backed one only when it is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

JUDGE_NAMES = ("auto", "refusal", "learned", "learned-pair", "beaverdam:<path-or-hub-id>",
               "llamaguard:<path-or-hub-id>", "qwen3guard:<path-or-hub-id>", "qwen3guard-loose:<path-or-hub-id>",
               "classifier:<path-or-hub-id>")
MODEL_JUDGES = ("beaverdam", "llamaguard", "qwen3guard", "qwen3guard-loose", "classifier")
DEFAULT_JUDGE = "auto"  # every command's default: the most accurate judge that runs with what the user gave
JUDGE_HELP = ("auto (learned with --judge_data_dir, else refusal), refusal, learned, learned-pair, "
              "qwen3guard[-loose]:<path>, llamaguard:<path>, beaverdam:<path> or classifier:<path>. Measured "
              "accuracy on held-out BeaverTails pairs: learned 71.9%%, refusal 62.1%% (docs/judges.md); Qwen3Guard "
              "is the recommended model judge.")
REFUSAL_WARNING = ("The refusal judge scores harm as the non-refusal rate: 62.1% accurate on held-out BeaverTails "
                   "pairs, it flags 83% of safe answers (docs/judges.md), so its score is an upper bound of harm. "
                   "Give the folder of labelled pairs (--judge_data_dir) for the learned judge (71.9%), or a "
                   "model judge (--judge qwen3guard:<path>).")


def resolve_judge(spec: str, data_dir: str | Path | None) -> str:
    """`auto` as the judge it stands for: `learned` when its labelled pairs are given, else `refusal`."""
    if spec.strip().lower() != "auto":
        return spec
    return "learned" if data_dir is not None else "refusal"


def check_judge_spec(spec: str) -> None:
    """Fail on a judge name `make_judge` would refuse, without loading or training anything."""
    kind, _, target = spec.partition(":")
    kind = kind.strip().lower()
    if (kind in ("auto", "refusal", "learned", "learned-pair") and not target) or (kind in MODEL_JUDGES and target):
        return
    raise ValueError(f"Unknown judge {spec!r}: use one of {', '.join(JUDGE_NAMES)}.")


def check_judge_inputs(spec: str, data_dir: str | Path | None) -> None:
    """`check_judge_spec`, and the learned judge's labelled pairs given: what a command checks at start-up."""
    check_judge_spec(spec)
    spec = resolve_judge(spec, data_dir)
    if spec.strip().lower() in ("learned", "learned-pair") and data_dir is None:
        raise ValueError(LEARNED_NEEDS_DATA)


LEARNED_NEEDS_DATA = ("The learned judges train on labelled (prompt, answer) pairs: give the folder holding them "
                      "(data_dir=; on the command line --judge_data_dir, or --data_dir in judge-check), or choose "
                      "another judge.")


def make_judge(spec: str, *, data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
               device: Any = None) -> Callable[[Sequence[str], Sequence[str]], list[bool]]:
    """A judge from its name: ``auto`` (``learned`` given ``data_dir``, else ``refusal``), ``refusal``, ``learned``
    (TF-IDF of the answer), ``learned-pair`` (the offline model trained as a pair classifier; minutes to train),
    ``beaverdam:``, ``llamaguard:``, ``qwen3guard:`` (strict; ``qwen3guard-loose:``) or ``classifier:<path>``.

    ``data_dir`` is the folder of labelled pairs the learned judges train on (required for them); ``cache_dir``
    where they keep the trained classifier.
    """
    check_judge_spec(spec)
    kind, _, target = resolve_judge(spec, data_dir).partition(":")
    kind = kind.strip().lower()
    if kind == "refusal":
        from transformers.utils import logging

        from ..evaluation.judges import RefusalJudge

        logging.get_logger("vaccine_trainer.commands").warning(REFUSAL_WARNING)
        return RefusalJudge()
    if kind in ("learned", "learned-pair"):
        if data_dir is None:
            raise ValueError(LEARNED_NEEDS_DATA)
        if kind == "learned-pair":
            from ..evaluation.pair_judge import PairClassifierJudge

            return PairClassifierJudge(data_dir, cache_dir=cache_dir, device=device)
        from ..evaluation.learned_judge import LearnedJudge

        return LearnedJudge(data_dir, cache_dir=cache_dir)
    from ..evaluation import model_judges

    if kind == "classifier":
        try:
            return model_judges.ClassifierJudge(target, device=device)
        except (OSError, KeyError) as error:
            raise ValueError(f"Judge {spec!r}: {target!r} is not a text-classification model that loads offline "
                             f"(a local folder with config.json and weights, or a cached hub id). Cause: {error}"
                             ) from error
    if kind in ("qwen3guard", "qwen3guard-loose"):
        return model_judges.Qwen3GuardJudge(target, mode="loose" if kind.endswith("loose") else "strict",
                                            device=device)
    return (model_judges.BeaverDamJudge if kind == "beaverdam" else model_judges.LlamaGuardJudge)(target, device=device)
