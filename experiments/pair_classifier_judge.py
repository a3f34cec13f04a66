"""A time-boxed try at a better offline judge (issue 29): the offline model fine-tuned as a (prompt, answer) classifier.

SmolLM2-135M-Instruct (the packaged offline model) with a 2-way classification head and LoRA on every projection,
trained on the learned judge's own training pairs (SafeRLHF + the BeaverTails pairs of non-held-out prompts, minus
evaluation and attack prompts; `split_labelled_pairs`), then measured on the held-out BeaverTails pairs the learned
judge is measured on (71.9%). Kept as a judge only if it beats that.

    python experiments/pair_classifier_judge.py --json docs/judges/pair_classifier.json [--train_rows 600]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TEMPLATE = "Question: {prompt}\nAnswer: {response}"


def encode(tokenizer, rows, max_length):
    texts = [TEMPLATE.format(prompt=r["prompt"], response=r["response"]) for r in rows]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": int(not bool(r["is_safe"]))}
            for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], rows)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--train_rows", type=int, default=600, help="Training pairs drawn (seeded) from the pool.")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/pair_classifier"))
    args = parser.parse_args(argv)

    import peft
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments
    from transformers.data.data_collator import DataCollatorWithPadding

    from vaccine_harness.evaluation.learned_judge import split_labelled_pairs
    from vaccine_harness.offline import offline_model_path

    torch.manual_seed(0)
    split = split_labelled_pairs(DATA)
    pool = list(split.train)
    random.Random(0).shuffle(pool)
    train_rows = pool[: args.train_rows]
    path = offline_model_path(args.work_dir / "base")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, task_type="SEQ_CLS",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    training = TrainingArguments(output_dir=str(args.work_dir / "run"), per_device_train_batch_size=8,
                                 learning_rate=5e-4, num_train_epochs=args.epochs, lr_scheduler_type="linear",
                                 warmup_steps=5, logging_steps=25, save_strategy="no", report_to="none",
                                 use_cpu=True, seed=0, train_sampling_strategy="group_by_length")
    trainer = Trainer(model=model, args=training, train_dataset=encode(tokenizer, train_rows, args.max_length),
                      data_collator=DataCollatorWithPadding(tokenizer))
    started = time.time()
    trainer.train()
    trained_s = time.time() - started

    model.eval()
    held = encode(tokenizer, split.held_out, args.max_length)
    collate = DataCollatorWithPadding(tokenizer)
    predictions = []
    started = time.time()
    with torch.inference_mode():
        for start in range(0, len(held), 16):
            batch = collate([{k: v for k, v in row.items() if k != "labels"} for row in held[start:start + 16]])
            predictions += model(**batch).logits.argmax(-1).tolist()
    judged_s = time.time() - started
    truth = [row["labels"] for row in held]
    tp = sum(p == t == 1 for p, t in zip(predictions, truth))
    fp = sum(p == 1 and t == 0 for p, t in zip(predictions, truth))
    result = {"judge": "SmolLM2-135M-Instruct + LoRA pair classifier", "train_rows": len(train_rows),
              "held_out_n": len(held), "accuracy": 100 * sum(p == t for p, t in zip(predictions, truth)) / len(held),
              "precision": 100 * tp / max(1, tp + fp), "recall": 100 * tp / max(1, sum(truth)),
              "false_positive_rate": 100 * fp / max(1, len(truth) - sum(truth)), "train_seconds": round(trained_s),
              "judge_seconds": round(judged_s), "epochs": args.epochs, "max_length": args.max_length,
              "command": "python experiments/pair_classifier_judge.py " + " ".join(sys.argv[1:])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
