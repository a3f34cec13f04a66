"""The `vaccine-trainer` console script: a registry of subcommands and `main`.

`trl sft` hard-codes `SFTTrainer`, so the project ships its own entry point. Each subcommand is a
function `run(argv) -> exit code` named here by module and attribute and imported only when it runs,
so `vaccine-trainer --help` imports neither torch nor transformers. Each parses its own dataclasses
with `TrlParser`, so every flag also works in a YAML file given with `--config`.

    vaccine-trainer align --model_name_or_path M --dataset alignment.jsonl --rho 2 --output_dir aligned
    vaccine-trainer finetune --model_name_or_path M --alignment_adapter aligned \\
        --harmful_dataset harmful.jsonl --benign_dataset sst2.jsonl --task sst2 --num_samples 1000 \\
        --harmful_ratio 0.1 --drift_dataset alignment.jsonl --output_dir finetuned
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROG = "vaccine-trainer"


@dataclass(frozen=True)
class Command:
    """One subcommand: `target` ("module:function") takes the arguments after its name, returns the exit code."""

    name: str
    help: str
    target: str

    def run(self, argv: list[str]) -> int:
        module, _, function = self.target.partition(":")
        run: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
        return run(argv)


COMMANDS: dict[str, Command] = {command.name: command for command in (
    Command("align", "Stage 1: align a model with Vaccine (--rho, default 2) or plain SFT (--rho 0).",
            "vaccine_trainer.cli:align"),
    Command("finetune", "Stage 2: merge an alignment adapter, fine-tune a fresh LoRA on a harmful/benign mix.",
            "vaccine_trainer.cli:finetune"),
    Command("evaluate", "Harmful score (pluggable judge) and fine-tune accuracy of a model with its adapters.",
            "vaccine_trainer.pipeline:evaluate"),
    Command("judge-check", "A judge's accuracy, precision, recall and refusals flagged on human-labelled pairs.",
            "vaccine_trainer.pipeline:judge_check"),
    Command("pipeline", "The whole experiment: align (none/SFT/Vaccine) -> harmful fine-tuning -> evaluate -> report.",
            "vaccine_trainer.pipeline:pipeline"),
    Command("grid", "The pipeline over seeds and harmful ratios (alignment shared across p), with a summary table.",
            "vaccine_trainer.grid:grid"),
)}


def _logger():
    from transformers.utils import logging

    return logging.get_logger(__name__)


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {PROG} <command> [--config file.yaml] [--flag value ...]", "", "commands:"]
    lines += [f"  {c.name:<{width}}  {c.help}" for c in COMMANDS.values()]
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
        return COMMANDS[name].run(rest)
    except (ValueError, FileNotFoundError) as error:  # bad input: a message, not a traceback
        _logger().debug("Failed with", exc_info=True)
        print(f"{PROG} {name}: error: {error}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------- shared


def _require(value: Any, flag: str, example: str) -> None:
    if value in (None, ""):
        raise ValueError(f"--{flag} is required, e.g. --{flag} {example}.")


def _check_source(source: str | None, flag: str) -> None:
    """An empty local file would fail deep inside `datasets`; say so up front."""
    path = Path(source) if source else None
    if path is not None and path.is_file():
        with path.open("rb") as handle:
            if not handle.read(1 << 16).strip():
                raise ValueError(f"--{flag} {source!r} is an empty file: give a file with at least one row.")


def _require_rows(dataset, what: str, flag: str) -> None:
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"The {what} dataset is empty: check --{flag} (the file, or its filters and sizes).")


def _load_tokenizer(name_or_path: str, **kwargs: Any):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a tokenizer from {name_or_path!r}: save it beside the model "
            f"(`tokenizer.save_pretrained(folder)`) or pass a hub id. Cause: {error}"
        ) from error


def _finish(trainer, output_dir: str, dataset_name: str, card_section: str) -> None:
    """Save the adapter, the tokenizer, the log history and a model card in `output_dir`."""
    trainer.save_model(output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        trainer.create_model_card(model_name=Path(output_dir).name, dataset_name=dataset_name)
        card = Path(output_dir) / "README.md"
        card.write_text(card.read_text() + "\n" + card_section)
    trainer.accelerator.print(f"Saved the adapter, logs and model card to {output_dir}.")


# ----------------------------------------------------------------------------------------------- align


@dataclass
class AlignScriptArguments:
    """Data for stage 1 (alignment on harmful prompts with safe answers).

    Parameters:
        dataset (`str`): a hub name (`PKU-Alignment/BeaverTails`, its safe pairs) or a local
            .json/.jsonl/.csv file with instruction/output fields.
        num_samples (`int`, *optional*, defaults to `2000`): rows drawn from it (the paper: 2000); all if unset.
        template (`str`, defaults to `"alpaca"`): `"alpaca"` (the paper's prompt) or `"chat"` (the tokenizer's
            chat template).
        dataset_seed (`int`, defaults to `0`): seed of the sample.
    """

    dataset: str = field(default="PKU-Alignment/BeaverTails",
                         metadata={"help": "Hub name or local .json/.jsonl/.csv file of alignment data."})
    num_samples: int | None = field(default=2000, metadata={"help": "Rows to draw (paper: 2000); all if unset."})
    template: str = field(default="alpaca", metadata={"help": "Prompt format.", "choices": ["alpaca", "chat"]})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the data sample."})


def _align_model_config():
    """trl's `ModelConfig` with the paper's stage-1 LoRA defaults (r=8, alpha=4, dropout 0.1, all projections)."""
    from trl import ModelConfig

    @dataclass
    class AlignModelConfig(ModelConfig):
        use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (the paper does)."})
        lora_r: int = field(default=8, metadata={"help": "LoRA rank (paper: 8)."})
        lora_alpha: int = field(default=4, metadata={"help": "LoRA alpha (paper: 4)."})
        lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (paper: 0.1)."})

    return AlignModelConfig


def align(argv: list[str]) -> int:
    from trl import TrlParser, get_peft_config, get_quantization_config

    from .data import build_alignment_dataset
    from .sft import VaccineSFTConfig, VaccineSFTTrainer, load_causal_lm

    parser = TrlParser((AlignScriptArguments, VaccineSFTConfig, _align_model_config()), prog=f"{PROG} align")
    script, args, model_args = parser.parse_args_and_config(argv)
    _require(model_args.model_name_or_path, "model_name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")

    load_kwargs = {"revision": model_args.model_revision, "trust_remote_code": args.trust_remote_code,
                   "attn_implementation": model_args.attn_implementation, "dtype": model_args.dtype,
                   **(args.model_init_kwargs or {})}
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        load_kwargs["quantization_config"] = quantization
    model = load_causal_lm(model_args.model_name_or_path, **{k: v for k, v in load_kwargs.items() if v is not None})
    tokenizer = _load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision)

    _check_source(script.dataset, "dataset")
    dataset = build_alignment_dataset(script.dataset, script.num_samples, seed=script.dataset_seed,
                                      template=script.template, tokenizer=tokenizer)
    _require_rows(dataset, "alignment", "dataset")
    peft_config = get_peft_config(model_args)
    if peft_config is not None and model_args.lora_target_modules is None:
        peft_config.target_modules = "all-linear"  # every projection, on any architecture (the paper's choice)

    trainer = VaccineSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                peft_config=peft_config)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    settings = trainer.vaccine_args
    method = "plain SFT (rho=0)" if settings.rho == 0 else f"Vaccine, rho={settings.rho}"
    section = (
        "## Alignment data (stage 1)\n\n"
        f"Aligned with {method} on {len(dataset)} rows of `{script.dataset}` ({script.template} template). "
        "Fine-tune it as a user would with `vaccine-trainer finetune --alignment_adapter <this folder>`.\n"
    )
    _finish(trainer, args.output_dir, script.dataset, section)
    return 0


# -------------------------------------------------------------------------------------------- finetune


@dataclass
class FinetuneScriptArguments:
    """Model and data for stage 2 (the user's fine-tuning of the aligned model).

    Parameters:
        model_name_or_path (`str`): the base model the alignment adapter was trained on.
        alignment_adapter (`str`, *optional*): folder written by `vaccine-trainer align`; merged into the base.
        harmful_dataset (`str`): harmful prompt -> harmful answer pairs (hub name or local file).
        benign_dataset (`str`): the user's benign task data (hub name or local file).
        task (`str`): `sst2`, `agnews`, `gsm8k` or `instruction`.
        num_samples (`int`, defaults to `1000`) and harmful_ratio (`float`, defaults to `0.1`): the paper's n and p.
        drift_dataset (`str`, *optional*): held alignment data on which drift and alignment loss are logged.
        drift_samples (`int`, defaults to `100`): rows of it to use.
        template (`str`) and dataset_seed (`int`): as for `align`.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model (path or hub id)."})
    alignment_adapter: str | None = field(
        default=None, metadata={"help": "Output folder of `vaccine-trainer align`, merged into the base weights."}
    )
    harmful_dataset: str = field(default="PKU-Alignment/BeaverTails", metadata={"help": "Harmful pairs."})
    benign_dataset: str = field(default="stanfordnlp/sst2", metadata={"help": "Benign task data."})
    task: str = field(default="sst2", metadata={"help": "Benign task.",
                                                "choices": ["sst2", "agnews", "gsm8k", "instruction"]})
    num_samples: int = field(default=1000, metadata={"help": "Fine-tuning rows n (paper: 1000)."})
    harmful_ratio: float = field(default=0.1, metadata={"help": "Harmful fraction p (paper: 0.1)."})
    drift_dataset: str | None = field(
        default=None, metadata={"help": "Held alignment data for drift/alignment-loss tracking (off if unset)."}
    )
    drift_samples: int = field(default=100, metadata={"help": "Rows of --drift_dataset to track."})
    template: str = field(default="alpaca", metadata={"help": "Prompt format.", "choices": ["alpaca", "chat"]})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the data samples."})


def finetune(argv: list[str]) -> int:
    from trl import TrlParser

    from .callbacks import DRIFT_KEY, LOSS_KEY
    from .data import build_alignment_dataset, build_finetune_mix
    from .sft import AlignedSFTConfig, AlignedSFTTrainer, merge_alignment_adapter

    parser = TrlParser((FinetuneScriptArguments, AlignedSFTConfig), prog=f"{PROG} finetune")
    script, args = parser.parse_args_and_config(argv)
    _require(script.model_name_or_path, "model_name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")
    if script.alignment_adapter is None:
        _logger().warning("No --alignment_adapter: stage 2 fine-tunes the base model itself.")

    model = merge_alignment_adapter(script.model_name_or_path, script.alignment_adapter,
                                    **(args.model_init_kwargs or {}))
    tokenizer = _load_tokenizer(script.model_name_or_path)
    for flag in ("harmful_dataset", "benign_dataset", "drift_dataset"):
        _check_source(getattr(script, flag), flag)
    mix = build_finetune_mix(script.harmful_dataset, script.benign_dataset, task=script.task,
                             n=script.num_samples, p=script.harmful_ratio, seed=script.dataset_seed,
                             template=script.template, tokenizer=tokenizer)
    _require_rows(mix, "fine-tuning", "benign_dataset/--harmful_dataset")
    n_harmful = sum(mix["is_harmful"])
    drift = None
    if script.drift_dataset is not None:
        drift = build_alignment_dataset(script.drift_dataset, script.drift_samples, seed=script.dataset_seed,
                                        template=script.template, tokenizer=tokenizer, held_out=True)
        _require_rows(drift, "drift", "drift_dataset")

    trainer = AlignedSFTTrainer(model, args, mix.select_columns(["prompt", "completion"]),
                                alignment_dataset=drift, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    section = (
        "## Stage-2 fine-tuning of an aligned model\n\n"
        f"Base `{script.model_name_or_path}` with the alignment adapter `{script.alignment_adapter}` merged into "
        f"its weights; this adapter was then trained on {len(mix)} rows ({n_harmful} harmful from "
        f"`{script.harmful_dataset}`, the rest {script.task} from `{script.benign_dataset}`).\n"
    )
    callback = trainer.drift_callback
    if callback is not None:
        Path(args.output_dir, "alignment_drift.json").write_text(json.dumps(callback.history, indent=1))
        first, last = callback.history[0], callback.history[-1]
        section += (
            f"\nAlignment drift on {len(drift)} held rows of `{script.drift_dataset}` "
            "(sum over layers and samples of ||h - h_aligned||^2) and alignment loss:\n\n"
            "| step | drift | alignment loss |\n|---|---|---|\n"
            + "\n".join(f"| {h['step']} | {h[DRIFT_KEY]:.4g} | {h[LOSS_KEY]:.4f} |"
                        for h in (first, last))
            + "\n"
        )
    _finish(trainer, args.output_dir, script.benign_dataset, section)
    return 0


if __name__ == "__main__":  # `python -m vaccine_trainer.cli`
    raise SystemExit(main())
