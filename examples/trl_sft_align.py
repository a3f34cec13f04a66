"""TRL's SFT example script (`trl/scripts/sft.py`) with Vaccine swapped in; changes are marked `# Vaccine`.

    python examples/trl_sft_align.py \
        --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \
        --dataset_name PKU-Alignment/BeaverTails \
        --rho 2 \
        --learning_rate 1.0e-3 \
        --num_train_epochs 1 \
        --per_device_train_batch_size 5 \
        --use_peft --lora_r 8 --lora_alpha 4 --lora_target_modules all-linear \
        --output_dir SmolLM2-135M-Vaccine

Offline, point `--datasets` (a YAML `--config` with a `datasets:` list, see trl's DatasetMixtureConfig)
or `--dataset_name` at a local folder of prompt/completion or messages JSON(L) files. Every `--rho`,
`--vaccine_*` flag also works in a YAML `--config`.
"""

import argparse


def main(script_args, training_args, model_args, dataset_args):
    import transformers
    from accelerate.logging import get_logger
    from datasets import load_dataset
    from packaging.version import Version
    from trl import get_dataset, get_peft_config, get_quantization_config

    from vaccine_trainer import VaccineSFTTrainer  # Vaccine: was `from trl import SFTTrainer`

    logger = get_logger(__name__)

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    # Load the dataset
    if dataset_args.datasets and script_args.dataset_name:
        logger.warning(
            "Both `datasets` and `dataset_name` are provided. The `datasets` argument will be used to load the "
            "dataset and `dataset_name` will be ignored."
        )
        dataset = get_dataset(dataset_args)
    elif dataset_args.datasets and not script_args.dataset_name:
        dataset = get_dataset(dataset_args)
    elif not dataset_args.datasets and script_args.dataset_name:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    else:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")

    # Initialize the SFT trainer
    trainer = VaccineSFTTrainer(  # Vaccine: was `SFTTrainer(`
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )

    # Train the model
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # Log training complete
    trainer.accelerator.print("✅ Training completed.")

    # Save and push to Hub
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"💾 Model saved to {training_args.output_dir}.")

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    # Finish the trackers and destroy the process group
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from vaccine_trainer import VaccineSFTConfig  # Vaccine: was `from trl import SFTConfig`; adds --rho etc.

    dataclass_types = (ScriptArguments, VaccineSFTConfig, ModelConfig, DatasetMixtureConfig)  # Vaccine
    if subparsers is not None:
        parser = subparsers.add_parser("sft", help="Run the SFT training script", dataclass_types=dataclass_types)
    else:
        parser = TrlParser(dataclass_types, prog=prog)
    return parser


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args, dataset_args)

    from vaccine_trainer.launch import exit_launched_rank

    exit_launched_rank(0)  # Vaccine (optional): a rank of `accelerate launch` skips the teardown that can abort it
