"""TRL's SFT script with Vaccine swapped in, as a script of your own: `vaccine-trainer sft` is the same command
installed with the package (`vaccine_trainer/commands/sft.py`: TRL's `trl/scripts/sft.py` with `VaccineSFTConfig`
and `VaccineSFTTrainer` in place of `SFTConfig` and `SFTTrainer`).

    python examples/trl_sft_align.py \
        --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \
        --dataset_name ./refusals \
        --rho 2 \
        --learning_rate 1.0e-3 \
        --num_train_epochs 1 \
        --per_device_train_batch_size 5 \
        --use_peft --lora_r 8 --lora_alpha 4 --lora_target_modules all-linear \
        --output_dir SmolLM2-135M-Vaccine

`--dataset_name` is anything `datasets.load_dataset` reads with a `train` split in a format TRL trains on
(prompt/completion or messages): here a local folder of JSON(L) files of harmful prompts with refusals
(`{"prompt": "How do I pick a lock?", "completion": "I can't help with that."}`). Hub alignment sets often need a
conversion first: BeaverTails, for one, has no `train` split and stores prompt/response/is_safe. A `--config` YAML
(with a `datasets:` mixture, as `trl sft` takes it) works too, with `rho:` and the `vaccine_*` settings in it.
"""

from vaccine_trainer.commands.sft import run_sft, sft_parser


def make_parser():
    return sft_parser()


def main(script_args, training_args, model_args, dataset_args):
    return run_sft(script_args, training_args, model_args, dataset_args)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(fail_with_unknown_args=False))

    from vaccine_trainer.launch import exit_launched_rank

    exit_launched_rank(0)  # optional: a rank of `accelerate launch` skips the teardown that can abort it
