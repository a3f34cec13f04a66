"""The `vaccine-trainer` console script: a registry of subcommands and `main`.

`trl sft` hard-codes `SFTTrainer`, so the project ships its own entry point. Each subcommand is a module with a
`main(argv) -> exit code`, named here (or by another package through an entry point) and imported only when it
runs, so `vaccine-trainer --help` imports neither torch nor transformers. Each parses its own dataclasses
with `TrlParser`, so every flag also works in a YAML file given with `--config`.

    vaccine-trainer align --model_name_or_path M --dataset alignment.jsonl --rho 2 --output_dir aligned
    vaccine-trainer finetune --model_name_or_path M --alignment_adapter aligned \\
        --harmful_dataset harmful.jsonl --benign_dataset sst2.jsonl --task sst2 --num_samples 1000 \\
        --harmful_ratio 0.1 --drift_dataset alignment.jsonl --output_dir finetuned
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import NoReturn

from .commands.common import PROG, logger
from .launch import LaunchFailedError, exit_launched_rank, launch, split_launch_flags

LAUNCHED = ("align", "finetune", "sft")  # commands that take --accelerate_config / --num_processes
# Other packages add subcommands through this entry-point group: each entry names a sequence of `Command`s. The
# experiment harness (`vaccine_harness`) adds evaluate, judge-check, pipeline, grid and sweep this way, so the
# library never imports it.
COMMANDS_ENTRY_POINT_GROUP = "vaccine_trainer.commands"


class MissingExtraError(ImportError):
    """A command run where the extra it needs is not installed."""


@dataclass(frozen=True)
class Command:
    """One subcommand: `target` ("module:function") takes the arguments after its name, returns the exit code.
    A command that needs an extra names it and the packages it brings (import name: distribution); it says which
    are missing, instead of failing on an import half-way."""

    name: str
    help: str
    target: str
    extra: str | None = None
    requires: Mapping[str, str] = field(default_factory=dict)

    def run(self, argv: list[str]) -> int:
        missing = [dist for module, dist in self.requires.items() if importlib.util.find_spec(module) is None]
        if missing:
            raise MissingExtraError(
                f"`{PROG} {self.name}` needs {', '.join(missing)}: pip install \"vaccine-trainer[{self.extra}]\" "
                f"(from a clone: pip install -e \".[{self.extra}]\").")
        module, _, function = self.target.partition(":")
        run: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
        return run(argv)


LIBRARY_COMMANDS: tuple[Command, ...] = (
    Command("align", "Stage 1: align a model with Vaccine (--rho, default 2) or plain SFT (--rho 0).",
            "vaccine_trainer.commands.align:main"),
    Command("sft", "`trl sft` with Vaccine: a TRL SFT YAML plus `rho: 2` (rho 0: exactly what `trl sft` trains).",
            "vaccine_trainer.commands.sft:main"),
    Command("finetune", "Stage 2: fine-tune a fresh LoRA over the aligned model on a harmful/benign mix "
            "(QLoRA: --load_in_4bit).",
            "vaccine_trainer.commands.finetune:main"),
    Command("env", "Versions, accelerator and accelerate config, for a bug report.",
            "vaccine_trainer.commands.env:main"),
)


@functools.cache
def commands() -> dict[str, Command]:
    """The library's commands, then those installed packages register under `COMMANDS_ENTRY_POINT_GROUP`."""
    found = {command.name: command for command in LIBRARY_COMMANDS}
    for entry_point in sorted(entry_points(group=COMMANDS_ENTRY_POINT_GROUP), key=lambda e: e.name):
        for command in entry_point.load():
            if command.name in found:
                raise ValueError(f"The entry point {entry_point.value} registers the command {command.name!r} again.")
            found[command.name] = command
    return found


def usage() -> str:
    registered = commands()
    width = max(len(name) for name in registered)
    lines = [f"usage: {PROG} <command> [--config file.yaml] [--flag value ...]", "", "commands:"]
    lines += [f"  {c.name:<{width}}  {c.help}" for c in registered.values() if c.extra is None]
    for extra in dict.fromkeys(c.extra for c in registered.values() if c.extra is not None):
        lines += ["", f'with the {extra} extra (pip install "vaccine-trainer[{extra}]"):']
        lines += [f"  {c.name:<{width}}  {c.help}" for c in registered.values() if c.extra == extra]
    lines += ["", f"`{PROG} <command> --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands():
        hint = "" if len(commands()) > len(LIBRARY_COMMANDS) else (
            f"\nNo package adds commands (entry-point group {COMMANDS_ENTRY_POINT_GROUP}): the experiment harness's "
            "(evaluate, judge-check, pipeline, grid, sweep) come with the package's metadata; in a clone installed "
            "before they moved, run `pip install -e .` again.")
        print(f"{PROG}: unknown command {name!r}; choose one of {sorted(commands())}.{hint}\n\n{usage()}",
              file=sys.stderr)
        return 2
    try:
        flags, own = split_launch_flags(rest) if name in LAUNCHED else ({}, rest)
        if flags:
            return launch(name, flags, own)  # the same command again, under `accelerate launch`
        return commands()[name].run(rest)
    except (ValueError, FileNotFoundError, MissingExtraError, LaunchFailedError) as error:  # a message, no traceback
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
