"""What every subcommand shares: the program name, input checks that fail early, tokenizer loading, saving."""

from __future__ import annotations

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

    def load_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` keyword arguments of the flags given."""
        kwargs = {"dtype": self.dtype, "attn_implementation": self.attn_implementation, "revision": self.model_revision}
        return {key: value for key, value in kwargs.items() if value is not None}


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
