"""`vaccine-trainer align`: stage 1, a LoRA adapter aligned with Vaccine (`--rho`, default 2) or plain SFT (`--rho 0`).

    vaccine-trainer align --model_name_or_path M --dataset alignment.jsonl --rho 2 --output_dir aligned
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config, get_quantization_config

from ..sft import VaccineSFTConfig
from .common import (
    check_source, command_description, load_tokenizer, logger, model_load_kwargs, require, require_rows, save_run,
    trainer_command_parser,
)
from .spellings import argv_for_installed


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
        probe_dataset (`str`, *optional*): harmful prompt -> harmful answer pairs that T-Vaccine
            (`--vaccine_layer_sampling true`) probes the layers with; probe_samples (`int`, defaults to `200`,
            the authors' size) rows of it are drawn with dataset_seed.
    """

    dataset: str = field(default="PKU-Alignment/BeaverTails",
                         metadata={"help": "Hub name or local .json/.jsonl/.csv file of alignment data."})
    num_samples: int | None = field(default=2000, metadata={"help": "Rows to draw (paper: 2000); all if unset."})
    template: str = field(default="alpaca", metadata={"help": "Prompt format.", "choices": ["alpaca", "chat"]})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the data sample."})
    probe_dataset: str | None = field(
        default=None, metadata={"help": "T-Vaccine: harmful prompt -> harmful answer pairs to probe the layers with."})
    probe_samples: int | None = field(default=200, metadata={"help": "T-Vaccine: probe rows to draw (authors: 200)."})


@dataclass
class AlignModelConfig(ModelConfig):
    """trl's `ModelConfig` with the paper's stage-1 LoRA defaults (r=8, alpha=4, dropout 0.1, all projections)."""

    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (the paper does)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (paper: 8)."})
    lora_alpha: int = field(default=4, metadata={"help": "LoRA alpha (paper: 4)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (paper: 0.1)."})


@dataclass
class AlignConfig(VaccineSFTConfig):
    """`VaccineSFTConfig` with the paper's stage-1 recipe as defaults (AdamW at lr 1e-3, weight decay 0.1, batch 5,
    200 tokens); its 50 epochs over 2,000 rows are left to the user (TRL's 3 by default)."""

    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (paper: 1e-3)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (paper: 0.1)."})
    per_device_train_batch_size: int = field(default=5, metadata={"help": "Batch size per device (paper: 5)."})
    max_length: int | None = field(default=200, metadata={"help": "Tokens per row, longer rows cut (paper: 200)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs (paper: 50 over 2,000 rows)."})


ALIGN_ARGUMENTS = (AlignScriptArguments, AlignConfig, AlignModelConfig)


def run_align(script: AlignScriptArguments, args: AlignConfig, model_args: AlignModelConfig) -> None:
    """Load the model and the alignment data, train the adapter, save it with its model card."""
    from ..data import build_alignment_dataset, build_harmful_dataset
    from ..sft import VaccineSFTTrainer, load_causal_lm

    require(model_args.model_name_or_path, "model_name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")
    load_kwargs = model_load_kwargs(model_args, args.trust_remote_code, args.model_init_kwargs)
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        load_kwargs["quantization_config"] = quantization
    tokenizer = load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision)

    # Every input is read before the model is loaded: a misspelled file should not cost a large model's load.
    check_source(script.dataset, "dataset")
    dataset = build_alignment_dataset(script.dataset, script.num_samples, seed=script.dataset_seed,
                                      template=script.template, tokenizer=tokenizer)
    require_rows(dataset, "alignment", "dataset")
    probe = None
    if args.vaccine_layer_sampling and script.probe_dataset:
        check_source(script.probe_dataset, "probe_dataset")
        probe = build_harmful_dataset(script.probe_dataset, script.probe_samples, seed=script.dataset_seed,
                                      template=script.template, tokenizer=tokenizer)
        require_rows(probe, "probe", "probe_dataset")
    elif script.probe_dataset:
        logger().warning("--probe_dataset is read by T-Vaccine only (--vaccine_layer_sampling true); ignored.")
    model = load_causal_lm(model_args.model_name_or_path, **{k: v for k, v in load_kwargs.items() if v is not None})
    peft_config = get_peft_config(model_args)
    if peft_config is not None and model_args.lora_target_modules is None:
        peft_config.target_modules = "all-linear"  # every projection, on any architecture (the paper's choice)

    trainer = VaccineSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                peft_config=peft_config, probe_dataset=probe)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    settings = trainer.vaccine_args
    method = "plain SFT (rho=0)" if settings.rho == 0 else f"Vaccine, rho={settings.rho}"
    if settings.vaccine_layer_sampling:
        method = (f"T-Vaccine, rho={settings.rho}, {settings.vaccine_sampled_layers} sampled layers "
                  f"({settings.vaccine_layer_probabilities})")
    section = (
        "## Alignment data (stage 1)\n\n"
        f"Aligned with {method} on {len(dataset)} rows of `{script.dataset}` ({script.template} template). "
        "Fine-tune it as a user would with `vaccine-trainer finetune --alignment_adapter <this folder>`.\n"
    )
    save_run(trainer, args.output_dir, script.dataset, section)


def main(argv: list[str]) -> int:
    parser = trainer_command_parser(ALIGN_ARGUMENTS, "align", description=command_description(__doc__))
    run_align(*parser.parse_args_and_config(argv_for_installed(argv)))
    return 0
