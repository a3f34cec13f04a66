"""The `vaccine-trainer` console script: a registry of subcommands and `main`.

`trl sft` hard-codes `SFTTrainer`, so the project ships its own entry point. Each subcommand is a module
of `vaccine_trainer.commands` with a `main(argv) -> exit code`, named here and imported only when it runs,
so `vaccine-trainer --help` imports neither torch nor transformers. Each parses its own dataclasses
with `TrlParser`, so every flag also works in a YAML file given with `--config`.

    vaccine-trainer align --model_name_or_path M --dataset alignment.jsonl --rho 2 --output_dir aligned
    vaccine-trainer finetune --model_name_or_path M --alignment_adapter aligned \\
        --harmful_dataset harmful.jsonl --benign_dataset sst2.jsonl --task sst2 --num_samples 1000 \\
        --harmful_ratio 0.1 --drift_dataset alignment.jsonl --output_dir finetuned
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from .commands.common import PROG, logger
from .launch import exit_launched_rank, launch, split_launch_flags

LAUNCHED = ("align", "finetune", "sft")  # commands that take --accelerate_config / --num_processes
# What the experiment harness (judges, intervals, plots) needs beyond the library: pyproject's `harness` extra.
HARNESS_PACKAGES = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "scipy": "scipy"}


class MissingExtraError(ImportError):
    """A harness command run where only the library is installed."""


@dataclass(frozen=True)
class Command:
    """One subcommand: `target` ("module:function") takes the arguments after its name, returns the exit code.
    A `harness` command (evaluation and experiments) needs the `harness` extra; the library's do not."""

    name: str
    help: str
    target: str
    harness: bool = False

    def run(self, argv: list[str]) -> int:
        if self.harness:
            missing = [dist for module, dist in HARNESS_PACKAGES.items() if importlib.util.find_spec(module) is None]
            if missing:
                raise MissingExtraError(
                    f"`{PROG} {self.name}` belongs to the experiment harness, which needs {', '.join(missing)}: "
                    "pip install \"vaccine-trainer[harness]\" (from a clone: pip install -e \".[harness]\").")
        module, _, function = self.target.partition(":")
        run: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
        return run(argv)


COMMANDS: dict[str, Command] = {command.name: command for command in (
    Command("align", "Stage 1: align a model with Vaccine (--rho, default 2) or plain SFT (--rho 0).",
            "vaccine_trainer.commands.align:main"),
    Command("sft", "`trl sft` with Vaccine: a TRL SFT YAML plus `rho: 2` (rho 0: exactly what `trl sft` trains).",
            "vaccine_trainer.commands.sft:main"),
    Command("finetune", "Stage 2: merge an alignment adapter, fine-tune a fresh LoRA on a harmful/benign mix.",
            "vaccine_trainer.commands.finetune:main"),
    Command("evaluate", "Harmful score (pluggable judge) and fine-tune accuracy of a model with its adapters.",
            "vaccine_trainer.commands.evaluate:main", harness=True),
    Command("judge-check", "A judge's accuracy, precision, recall and refusals flagged on human-labelled pairs.",
            "vaccine_trainer.commands.judge_check:main", harness=True),
    Command("pipeline", "The whole experiment: align (none/SFT/Vaccine) -> harmful fine-tuning -> evaluate -> report.",
            "vaccine_trainer.commands.pipeline:main", harness=True),
    Command("grid", "The pipeline over seeds and harmful ratios (alignment shared across p), with a summary table.",
            "vaccine_trainer.commands.grid:main", harness=True),
    Command("sweep", "Stage 2 over attacker settings (lr x epochs) per aligned arm: the surface and the worst case.",
            "vaccine_trainer.commands.sweep:main", harness=True),
    Command("env", "Versions, accelerator and accelerate config, for a bug report.",
            "vaccine_trainer.commands.env:main"),
)}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {PROG} <command> [--config file.yaml] [--flag value ...]", "", "commands:"]
    lines += [f"  {c.name:<{width}}  {c.help}" for c in COMMANDS.values() if not c.harness]
    lines += ["", 'experiment harness (pip install "vaccine-trainer[harness]"):']
    lines += [f"  {c.name:<{width}}  {c.help}" for c in COMMANDS.values() if c.harness]
    lines += ["", f"`{PROG} <command> --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{PROG}: unknown command {name!r}; choose one of {sorted(COMMANDS)}.\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        flags, own = split_launch_flags(rest) if name in LAUNCHED else ({}, rest)
        if flags:
            return launch(name, flags, own)  # the same command again, under `accelerate launch`
        return COMMANDS[name].run(rest)
    except (ValueError, FileNotFoundError, MissingExtraError) as error:  # bad input: a message, not a traceback
        logger().debug("Failed with", exc_info=True)
        print(f"{PROG} {name}: error: {error}", file=sys.stderr)
        return 1
    finally:
        _end_process_group()


def run() -> NoReturn:
    """The console script and `python -m vaccine_trainer.cli` (how `accelerate launch` starts each rank): `main`,
    then the exit; a launched rank leaves without the interpreter's finalization (`exit_launched_rank`)."""
    exit_launched_rank(main())


def _end_process_group() -> None:
    """End a launched rank's process group while the interpreter is whole (left to its exit, a rank could abort
    after its work was saved, failing the launch); `run` then leaves without the finalization."""
    if "torch" not in sys.modules:  # no torch, no process group
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run()
