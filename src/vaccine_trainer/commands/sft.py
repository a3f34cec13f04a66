"""`vaccine-trainer sft`: TRL's `trl sft` with Vaccine in it, so a `trl sft` YAML plus `rho: 2` aligns with Vaccine.

It takes exactly what `trl sft` takes (TRL's script arguments, dataset mixtures, model and SFT settings, `--config`
YAML) and loads the data with TRL's own functions; `VaccineSFTConfig` / `VaccineSFTTrainer` stand where TRL's
script has `SFTConfig` / `SFTTrainer`, which adds `--rho` and the `--vaccine_*` settings. `rho: 0` trains what
`trl sft` trains on the same YAML. `--accelerate_config` / `--num_processes` launch it as `align` does.

    vaccine-trainer sft --config my_trl_sft.yaml --rho 2
"""

from __future__ import annotations

from typing import Any

from .common import command_description, model_load_kwargs, trainer_command_parser
from .spellings import argv_for_installed


def sft_parser():
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from ..sft import VaccineSFTConfig

    return trainer_command_parser((ScriptArguments, VaccineSFTConfig, ModelConfig, DatasetMixtureConfig), "sft",
                                  description=command_description(__doc__))


def load_sft_dataset(script_args: Any, dataset_args: Any):
    """The training data as `trl sft` loads it: a `datasets:` mixture, or `--dataset_name` (and its config)."""
    from datasets import load_dataset
    from trl import get_dataset

    from .common import logger

    if dataset_args.datasets:
        if script_args.dataset_name:
            logger().warning("Both `datasets` and `dataset_name` are given: `datasets` is used, as by `trl sft`.")
        return get_dataset(dataset_args)
    if script_args.dataset_name:
        return load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                            streaming=script_args.dataset_streaming)
    raise ValueError("Give the training data as `trl sft` takes it: --dataset_name NAME_OR_FOLDER, or a `datasets:` "
                     "list in the --config YAML.")


def run_sft(script_args: Any, training_args: Any, model_args: Any, dataset_args: Any):
    """TRL's SFT script (`trl/scripts/sft.py`) with `VaccineSFTTrainer`; returns the trainer."""
    from trl import get_peft_config, get_quantization_config

    from ..sft import VaccineSFTTrainer

    training_args.model_init_kwargs = model_load_kwargs(model_args, training_args.trust_remote_code,
                                                        training_args.model_init_kwargs)
    dataset = load_sft_dataset(script_args, dataset_args)
    if script_args.dataset_train_split not in dataset:
        raise ValueError(f"The dataset has no split {script_args.dataset_train_split!r} (it has {list(dataset)}): "
                         "set --dataset_train_split.")
    trainer = VaccineSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def main(argv: list[str]) -> int:
    run_sft(*sft_parser().parse_args_and_config(argv_for_installed(argv), fail_with_unknown_args=False))
    return 0
