"""`vaccine-trainer finetune`: stage 2, the user's fine-tuning of an aligned model on a harmful/benign mix.

    vaccine-trainer finetune --model_name_or_path M --alignment_adapter aligned \\
        --harmful_dataset harmful.jsonl --benign_dataset sst2.jsonl --task sst2 --num_samples 1000 \\
        --harmful_ratio 0.1 --drift_dataset alignment.jsonl --output_dir finetuned
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..markdown import markdown_table
from ..sft import AlignedSFTConfig
from .common import (
    ModelLoadingArguments, check_source, command_description, load_tokenizer, logger, model_load_kwargs, require,
    require_rows, save_run, trainer_command_parser,
)
from .spellings import argv_for_installed

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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
        load_in_4bit (`bool`, defaults to `False`): QLoRA; the alignment adapter is kept beside, not merged.
        second_dataset (`str`, *optional*), second_task (`str`, defaults to `"instruction"`) and second_fraction
            (`float`, defaults to `0.5`): that share of the benign rows from a second task instead.
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
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the base in 4 bits (bitsandbytes nf4); the alignment adapter then stays a frozen "
                "adapter beside the new one instead of being merged."})
    # `--second_benign_*`: the pipeline's names for the same settings, accepted here too
    second_dataset: str | None = field(default=None, metadata={
        "help": "A second benign task's data, mixed into the benign rows (off if unset).",
        "aliases": ["--second_benign_dataset"]})
    second_task: str = field(default="instruction", metadata={
        "help": "The second benign task.", "choices": ["sst2", "agnews", "gsm8k", "instruction"],
        "aliases": ["--second_benign_task"]})
    second_fraction: float = field(default=0.5, metadata={
        "help": "Share of the benign rows from the second task.", "aliases": ["--second_benign_fraction"]})


FINETUNE_ARGUMENTS = (FinetuneScriptArguments, AlignedSFTConfig, ModelLoadingArguments)


def run_finetune(script: FinetuneScriptArguments, args: AlignedSFTConfig,
                 model_args: ModelLoadingArguments | None = None) -> None:
    """Merge the alignment adapter, train a fresh LoRA on the mix (tracking drift), save it with its card."""
    from ..data import build_alignment_dataset, build_finetune_mix
    from ..sft import AlignedSFTTrainer
    from ..stage2_output import write_stage2_record

    require(script.model_name_or_path, "model_name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")
    if script.alignment_adapter is None:
        logger().warning("No --alignment_adapter: stage 2 fine-tunes the base model itself.")
    for flag in ("harmful_dataset", "benign_dataset", "drift_dataset", "second_dataset"):
        check_source(getattr(script, flag), flag)

    # Every input is read before the model is loaded and merged: a misspelled file should not cost that.
    tokenizer = load_tokenizer(script.model_name_or_path)
    mix = build_finetune_mix(script.harmful_dataset, script.benign_dataset, task=script.task,
                             n=script.num_samples, p=script.harmful_ratio, seed=script.dataset_seed,
                             template=script.template, tokenizer=tokenizer, second_source=script.second_dataset,
                             second_task=script.second_task, second_fraction=script.second_fraction)
    require_rows(mix, "fine-tuning", "benign_dataset/--harmful_dataset")
    drift = None
    if script.drift_dataset is not None:
        drift = build_alignment_dataset(script.drift_dataset, script.drift_samples, seed=script.dataset_seed,
                                        template=script.template, tokenizer=tokenizer, held_out=True)
        require_rows(drift, "drift", "drift_dataset")
    model, alignment = load_stage2_model(script, args, model_args or ModelLoadingArguments())
    trainer = AlignedSFTTrainer(model, args, mix.select_columns(["prompt", "completion"]),
                                alignment_adapter=alignment, alignment_dataset=drift, processing_class=tokenizer)
    dropped = len(mix) - len(trainer.train_dataset)
    if dropped:  # TRL drops rows whose completion the truncation removed entirely
        logger().warning(f"{dropped} of {len(mix)} fine-tuning rows have no completion token within --max_length "
                         f"{args.max_length} (their prompt fills it) and are left out of training; raise "
                         "--max_length to keep them.")
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    callback = trainer.drift_callback
    if callback is not None:
        Path(args.output_dir, "alignment_drift.json").write_text(json.dumps(callback.history, indent=1))
    section = stage2_card_section(script, args, mix, dropped, drift, callback)
    save_run(trainer, args.output_dir, script.benign_dataset, section,
             write_extras=lambda output: write_stage2_record(output, script.model_name_or_path,
                                                              script.alignment_adapter))


def load_stage2_model(script: FinetuneScriptArguments, args: AlignedSFTConfig, model_args: ModelLoadingArguments
                      ) -> tuple[PreTrainedModel, str | None]:
    """The model stage 2 trains, and the alignment adapter to keep beside the new one (None once merged): the base
    with the alignment adapter merged in, or with `--load_in_4bit` the 4-bit base, which takes no merge."""
    from ..sft import load_causal_lm, merge_alignment_adapter

    load_kwargs = model_load_kwargs(model_args, args.trust_remote_code, args.model_init_kwargs)
    if not script.load_in_4bit:
        return merge_alignment_adapter(script.model_name_or_path, script.alignment_adapter, **load_kwargs), None
    import torch
    from transformers import BitsAndBytesConfig

    dtype = load_kwargs.get("dtype") or "float32"  # the 4-bit layers compute in it
    compute = getattr(torch, dtype) if dtype != "auto" else (
        torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    load_kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    load_kwargs.setdefault("device_map", {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu")
    return load_causal_lm(script.model_name_or_path, **load_kwargs), script.alignment_adapter


def stage2_card_section(script: FinetuneScriptArguments, args: AlignedSFTConfig, mix, dropped: int, drift,
                        callback) -> str:
    """The card's account of stage 2: data, drift from the aligned model, stage 1's settings, how to load."""
    from ..callbacks import DRIFT_FRACTION_KEY, DRIFT_KEY, LOSS_KEY, MEDIAN_TOKEN_DRIFT_KEY
    from ..stage2_output import alignment_settings

    n_harmful = sum(mix["is_harmful"])
    section = (
        "## Stage-2 fine-tuning of an aligned model\n\n"
        + (f"Base `{script.model_name_or_path}` with the alignment adapter `{script.alignment_adapter}` merged into "
           "its weights; " if script.alignment_adapter is not None
           else f"Base `{script.model_name_or_path}`, no alignment adapter; ")
        + f"this adapter was then trained on {len(mix)} rows ({n_harmful} harmful from "
        f"`{script.harmful_dataset}`, the rest {script.task} from `{script.benign_dataset}`)"
        + (f", of which {dropped} were left out: no completion token within max_length {args.max_length}"
           if dropped else "") + ".\n"
    )
    if callback is not None:
        first, last = callback.history[0], callback.history[-1]
        section += (
            f"\nAlignment drift on {len(drift)} held rows of `{script.drift_dataset}` "
            "(sum over layers and samples of ||h - h_aligned||^2) and alignment loss:\n\n"
            + "\n".join(markdown_table(
                ["step", "drift", "drift fraction", "median token drift", "alignment loss"],
                [[str(h["step"]), f"{h[DRIFT_KEY]:.4g}", f"{h[DRIFT_FRACTION_KEY]:.4g}",
                  f"{h[MEDIAN_TOKEN_DRIFT_KEY]:.4g}", f"{h[LOSS_KEY]:.4f}"] for h in (first, last)], numeric_from=5))
            + "\n"
        )
    stage_one = alignment_settings(script.alignment_adapter)
    if stage_one is not None:
        section += ("\nThe alignment adapter (stage 1) was trained with "
                    + ", ".join(f"`{name}={value}`" for name, value in stage_one.items()) + ".\n")
    if script.alignment_adapter is not None:
        section += (
            "\nThis adapter was trained on the base **with the alignment adapter merged**: the base plus this adapter "
            "alone (what `adapter_config.json` names, and what `AutoPeftModelForCausalLM` would load) lacks the "
            "alignment. The alignment adapter is in `alignment_adapter/`, and `vaccine_stage2.json` says how they "
            "fit:\n\n```python\nfrom vaccine_trainer import load_finetuned_model\n\n"
            f"model = load_finetuned_model(\"{args.hub_model_id or args.output_dir}\")\n```\n"
        )
    return section


def main(argv: list[str]) -> int:
    parser = trainer_command_parser(FINETUNE_ARGUMENTS, "finetune", method_first=False,
                                    description=command_description(__doc__))
    run_finetune(*parser.parse_args_and_config(argv_for_installed(argv)))
    return 0
