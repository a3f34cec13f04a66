"""`vaccine-trainer judge-check`: a judge's accuracy, precision, recall and refusals flagged on labelled pairs."""

from __future__ import annotations

import functools
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from vaccine_trainer.commands.common import PROG, check_source, require, command_description

from .evaluate import build_judge
from .judge_names import DEFAULT_JUDGE, JUDGE_HELP


@dataclass
class JudgeCheckArguments:
    """A judge's accuracy, precision and recall on human-labelled pairs (`prompt`, `response`, `is_safe`).

    Parameters:
        judge (`str`, defaults to `"auto"`, the learned judge given `data_dir`): a judge name as `--judge` takes it
            (`vaccine-trainer evaluate --help`).
        labelled (`str`): a .jsonl file of labelled pairs, e.g. beavertails_qa_labeled.jsonl.
        held_out_only (`bool`, defaults to `False`): keep only the pairs whose prompts the learned judge held out
            (for BeaverTails; measuring the learned judge on pairs it trained on says little).
        refusals (`str`, *optional*): a .jsonl file of known refusals (`instruction`, `output`), e.g.
            alignment_refusals.jsonl: the share the judge flags is reported.
        data_dir (`str`, *optional*): the folder of labelled pairs the learned judge trains on (and whose split
            `held_out_only` reads); required by `--judge learned` and `--held_out_only`.
        output_file (`str`, *optional*): also write the figures as JSON.
    """

    judge: str = field(default=DEFAULT_JUDGE, metadata={"help": JUDGE_HELP})
    labelled: str | None = field(default=None, metadata={"help": "Labelled pairs (.jsonl: prompt, response, is_safe)."})
    held_out_only: bool = field(default=False, metadata={"help": "Only the learned judge's held-out prompts."})
    refusals: str | None = field(default=None, metadata={"help": "Known refusals (.jsonl: instruction, output)."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Folder of the learned judge's training pairs (needed by --judge learned and --held_out_only)."})
    output_file: str | None = field(default=None, metadata={"help": "Write the figures as JSON here too."})


def run_judge_check(args: JudgeCheckArguments):
    from ..evaluation import check_judge, split_labelled_pairs
    from ..evaluation.judge_accuracy import validate_labelled
    from ..evaluation.learned_judge import read_jsonl

    from .judge_names import check_judge_inputs, resolve_judge

    require(args.labelled, "labelled", "data/beavertails_qa_labeled.jsonl")
    check_judge_inputs(args.judge, args.data_dir)
    args.judge = resolve_judge(args.judge, args.data_dir)
    if args.held_out_only:
        require(args.data_dir, "data_dir", "path/to/data (the folder whose split says which prompts are held out)")
    for flag in ("labelled", "refusals"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--{flag} {path!r} is not a file.")
    check_source(args.labelled, "labelled")
    rows = read_jsonl(args.labelled)
    validate_labelled(rows, args.labelled)
    source = Path(args.labelled).name
    if args.held_out_only:
        held = {row["prompt"] for row in split_labelled_pairs(args.data_dir).held_out}
        rows = [row for row in rows if row["prompt"] in held]
        if not rows:
            raise ValueError(f"No pair of {args.labelled} has a held-out prompt: --held_out_only is meant for "
                             "beavertails_qa_labeled.jsonl.")
        source += " (held-out prompts)"
    refusals = read_jsonl(args.refusals) if args.refusals else []
    if refusals and not {"instruction", "output"} <= set(refusals[0]):
        raise ValueError(f"--refusals {args.refusals!r} needs `instruction` and `output` fields; it has "
                         f"{sorted(refusals[0])}.")
    judge = build_judge(args.judge, args.data_dir)
    # Train (or load) a learned judge before the judging is timed; `hasattr` would run the cached property itself,
    # before the clock starts.
    if isinstance(inspect.getattr_static(judge, "classifier", None), functools.cached_property):
        started = time.perf_counter()
        judge.classifier
        if getattr(judge, "trained_now", False):
            print(f"Trained the {args.judge} judge in {time.perf_counter() - started:.3g} s.")
    check = check_judge(judge, rows, source=source, refusals=refusals)
    line = (f"{check.judge} on {check.labelled}: accuracy {check.accuracy:.1f}%, precision {_pct(check.precision)}, "
            f"recall {_pct(check.recall)}, safe answers flagged {_pct(check.false_positive_rate)} (n={check.n}, "
            f"{check.seconds:.1f} s)")
    if check.refusals_flagged is not None:
        line += f"; refusals flagged {check.refusals_flagged:.1f}% of {check.refusals_n}"
    print(line)
    for category, entry in check.per_category.items():
        print(f"  {category}: recall {entry['recall']:.1f}% (n={entry['n']})")
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_file).write_text(json.dumps(check.to_dict(), indent=1) + "\n")
    return check


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}%"


def main(argv: list[str]) -> int:
    from trl import TrlParser

    (args,) = TrlParser((JudgeCheckArguments,), prog=f"{PROG} judge-check",
                        description=command_description(__doc__)).parse_args_and_config(argv)
    run_judge_check(args)
    return 0
