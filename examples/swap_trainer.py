"""An ordinary Hugging Face training script; the only Vaccine changes are marked `# Vaccine`.

    python examples/swap_trainer.py --model_name_or_path PATH --data_file ../shared/data/alignment_refusals.jsonl \
        --output_dir outputs/swap --rho 2 --max_steps 20

It fine-tunes LoRA adapters on instruction -> response rows (JSON/JSONL/CSV with `instruction` and
`output` columns), with the loss on the response only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import peft
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, HfArgumentParser

from vaccine_trainer import VaccineTrainer as Trainer  # Vaccine: was `from transformers import Trainer`
from vaccine_trainer import VaccineTrainingArguments as TrainingArguments  # Vaccine: adds --rho etc.
from vaccine_trainer.launch import exit_launched_rank  # Vaccine (optional): see the end of the file

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local model folder or hub id."})
    lora_r: int = field(default=8)
    lora_alpha: int = field(default=4)
    lora_dropout: float = field(default=0.1)


@dataclass
class DataArguments:
    data_file: str = field(metadata={"help": "JSON/JSONL/CSV file with `instruction` and `output` columns."})
    max_length: int = field(default=200)
    max_samples: int | None = field(default=None)


def main() -> None:
    model_args, data_args, training_args = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments)
    ).parse_args_into_dataclasses()

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules="all-linear", task_type="CAUSAL_LM"))

    extension = data_args.data_file.rsplit(".", 1)[-1].replace("jsonl", "json")
    dataset = load_dataset(extension, data_files=data_args.data_file, split="train")
    if data_args.max_samples is not None:
        dataset = dataset.select(range(min(data_args.max_samples, len(dataset))))

    def tokenize(row):
        prompt = tokenizer(PROMPT.format(instruction=row["instruction"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["output"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        input_ids = (prompt + answer)[: data_args.max_length]
        labels = ([-100] * len(prompt) + answer)[: data_args.max_length]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    dataset = dataset.map(tokenize, remove_columns=dataset.column_names)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    trainer.train()
    trainer.save_model()
    tokenizer.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    main()
    exit_launched_rank(0)  # Vaccine (optional): a rank of `accelerate launch` skips the teardown that can abort it
