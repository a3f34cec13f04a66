"""The harness's subcommands of `vaccine-trainer`, one module each, and `COMMANDS`, the registry the library's CLI
loads through the `vaccine_trainer.commands` entry point (so the library never names them).

- `evaluate`: harmful score (with the judge's measured accuracy), task accuracy, judge-free metrics.
- `judge_check`: a judge measured on human-labelled pairs; `judge_names`: judges built from names.
- `pipeline`: align -> finetune -> evaluate per method, resumable by phase, with a report.
- `grid`: the pipeline over seeds and harmful ratios, and the summary across them.
- `sweep`: stage 2 over the attacker's settings per aligned arm, and the worst case per arm;
  `sweep_pairs` its paired differences, `verdict_files` its per-prompt verdicts.
- `parallel_jobs`, `sweep_worker`: `sweep --workers N`, its cells as processes side by side.

Importing this package imports no torch, transformers, TRL or any harness-extra package: `vaccine-trainer --help`
reads the registry.
"""

from __future__ import annotations

from vaccine_trainer.cli import Command

# What the harness needs beyond the library (import name: distribution): pyproject's `harness` extra.
HARNESS_PACKAGES = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "scipy": "scipy"}


def _harness(name: str, help: str, target: str) -> Command:
    return Command(name, help, f"vaccine_harness.commands.{target}", extra="harness", requires=HARNESS_PACKAGES)


COMMANDS: tuple[Command, ...] = (
    _harness("evaluate", "Harmful score (pluggable judge) and fine-tune accuracy of a model with its adapters.",
             "evaluate:main"),
    _harness("judge-check", "A judge's accuracy, precision, recall and refusals flagged on human-labelled pairs.",
             "judge_check:main"),
    _harness("pipeline", "The whole experiment: align (none/SFT/Vaccine) -> harmful fine-tuning -> evaluate -> report.",
             "pipeline:main"),
    _harness("grid", "The pipeline over seeds and harmful ratios (alignment shared across p), with a summary table.",
             "grid:main"),
    _harness("sweep", "Stage 2 over attacker settings (lr x epochs) per aligned arm: the surface and the worst case.",
             "sweep:main"),
)
