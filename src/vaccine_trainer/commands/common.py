"""What every subcommand shares: the program name, input checks that fail early, tokenizer loading, saving."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROG = "vaccine-trainer"


@dataclass
class ModelLoadingArguments:
    """How the base model is loaded, with the names of TRL's `ModelConfig` (`trust_remote_code` is the
    Trainer's own flag where a command has training arguments)."""

    dtype: str | None = field(default=None, metadata={
        "help": "Weights' dtype (auto, bfloat16, float16, float32); transformers' default if unset.",
        "choices": ["auto", "bfloat16", "float16", "float32"]})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, flash_attention_2."})
    model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a hub model."})


def model_load_kwargs(model_args: Any, trust_remote_code: bool = False,
                      model_init_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments of every command: the model flags (`dtype`, `attn_implementation`,
    `model_revision`, on `ModelLoadingArguments` or TRL's `ModelConfig`) and the training arguments'
    `trust_remote_code`, unset ones left out (from_pretrained's defaults), with `model_init_kwargs` on top."""
    flags = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation,
             "revision": model_args.model_revision, "trust_remote_code": trust_remote_code or None}
    return {**{key: value for key, value in flags.items() if value is not None}, **(model_init_kwargs or {})}


def require(value: Any, flag: str, example: str) -> None:
    """A required flag that was not given: name it and show an example."""
    if value in (None, ""):
        raise ValueError(f"--{flag} is required, e.g. --{flag} {example}.")


def check_source(source: str | None, flag: str) -> None:
    """An empty local file would fail deep inside `datasets`; say so up front."""
    path = Path(source) if source else None
    if path is not None and path.is_file():
        with path.open("rb") as handle:
            if not handle.read(1 << 16).strip():
                raise ValueError(f"--{flag} {source!r} is an empty file: give a file with at least one row.")


def require_rows(dataset, what: str, flag: str) -> None:
    """A dataset left empty by its filters or sizes: say which flag to check."""
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"The {what} dataset is empty: check --{flag} (the file, or its filters and sizes).")


def load_tokenizer(name_or_path: str, **kwargs: Any):
    """`AutoTokenizer.from_pretrained` with a message that says how to fix a folder without a tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        where = "a folder without tokenizer files" if Path(name_or_path).is_dir() else "no such local folder"
        raise ValueError(
            f"Could not load the model's tokenizer from {name_or_path!r} ({where}): pass a folder written by "
            "`save_pretrained` with its tokenizer saved beside the model (`tokenizer.save_pretrained(folder)`), or "
            f"a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct' (with network access). Cause: {error}"
        ) from error


def save_run(trainer, output_dir: str, dataset_name: str, card_section: str, write_extras=None) -> None:
    """Save the adapter, the tokenizer, the log history and a model card in `output_dir`; with `--push_to_hub`,
    push last, once everything is there (`Trainer.save_model` would push before the state and the card).

    `write_extras(output_dir)` writes what else the output needs (on the main process), before any push.
    """
    trainer.model_card_sections.append(card_section)  # written into every card, the pushed one's too
    trainer.save_state()
    if trainer.is_world_process_zero() and write_extras is not None:
        write_extras(output_dir)
    if trainer.args.push_to_hub:
        trainer.push_to_hub(model_name=Path(output_dir).name, dataset_name=dataset_name)  # save, card, upload
        trainer.accelerator.print(f"Saved to {output_dir} and pushed to {trainer.hub_model_id}.")
        return
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        trainer.create_model_card(model_name=Path(output_dir).name, dataset_name=dataset_name)
    trainer.accelerator.print(f"Saved the adapter, logs and model card to {output_dir}.")


def logger():
    """transformers' logger for the commands, imported only when something is logged."""
    from transformers.utils import logging

    return logging.get_logger("vaccine_trainer.commands")


LAUNCH_HELP = {
    "--accelerate_config": "Run under `accelerate launch` with this config: multi_gpu, fsdp2, zero2, zero3 (shipped in "
                           "the package) or a path to an accelerate YAML.",
    "--num_processes": "Processes (GPUs) of the launch.",
    "--main_process_port": "Port of the launch's main process.",
    "--mixed_precision": "accelerate's mixed precision of the launch (no, fp16, bf16).",
}


def command_description(module_doc: str | None) -> str:
    """A command's `--help` description: the first paragraph of its module's docstring."""
    return (module_doc or "").strip().split("\n\n")[0]


def trainer_command_parser(dataclass_types, command: str, method_first: bool = True, description: str | None = None):
    """A `TrlParser` whose `--help` starts with what a user of this command comes for: Vaccine's own flags (from
    `VaccineArguments`) first, then the launch flags (taken before parsing, so listed here), then the rest; the
    usage line names the main flags instead of all several hundred."""
    from dataclasses import fields

    from trl import TrlParser

    from ..config import VaccineArguments
    from ..launch import LAUNCH_FLAGS

    method = "[--rho RHO] [--vaccine_norm NORM] " if method_first else ""
    parser = TrlParser(dataclass_types, prog=f"{PROG} {command}", description=description,
                       usage=f"{PROG} {command} [--config FILE.yaml] {method}[--model_name_or_path M] [--output_dir "
                             "DIR] [--accelerate_config NAME] [--num_processes N] [...] (every flag below)")
    groups = []
    if method_first:
        vaccine = parser.add_argument_group(
            "Vaccine", "The method's settings (VaccineArguments); rho is the perturbation's size, see --vaccine_norm.")
        names = {f"--{f.name}" for f in fields(VaccineArguments)}
        for group in parser._action_groups:
            for action in list(group._group_actions):
                if set(action.option_strings) & names:
                    group._group_actions.remove(action)
                    vaccine._group_actions.append(action)
        groups.append(vaccine)
    launch = parser.add_argument_group(
        "Launch", "Read before anything else: the command re-runs itself under `accelerate launch` with them.")
    for flag in LAUNCH_FLAGS:
        launch.add_argument(flag, default=argparse.SUPPRESS, help=LAUNCH_HELP[flag])  # never a parsed value
    groups.append(launch)
    for group in groups:  # before transformers' and TRL's long lists
        parser._action_groups.remove(group)
    parser._action_groups[1:1] = groups
    return parser
