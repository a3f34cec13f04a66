"""One Vaccine run through Unsloth, in a process of its own: Unsloth must be imported before transformers and TRL
(it replaces `trl.SFTTrainer` on import), which the test process has already imported.

    python tests/unsloth_worker.py OUTPUT_DIR CHECKPOINTING RHO [4bit]

Loads a tiny saved Llama with `FastLanguageModel` (with `4bit`, Unsloth's QLoRA: a bitsandbytes 4-bit base), adds
LoRA adapters with `FastLanguageModel.get_peft_model(..., use_gradient_checkpointing=CHECKPOINTING)` ("unsloth",
"true" or "false"), trains two micro-batches of gradient accumulation (one SGD step) with `VaccineSFTTrainer` (or
trl's SFTTrainer, Unsloth's after the import, where RHO is "plain"), and prints one JSON line: the update, the
paper's formula on an identical second copy of the model over the batches the trainer saw
(`testing_utils.reference_gradients`), the classes involved and the logged metrics.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
import unsloth  # noqa: E402,F401  (first: it patches transformers and TRL on import)
from unsloth import FastLanguageModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from testing_utils import (  # noqa: E402
    LR, perturbed_modules, reference_gradients, save_tiny_causal_lm, token_rows, trainable_state, training_args,
)

from vaccine_trainer import VaccineSFTConfig, VaccineSFTTrainer  # noqa: E402

output_dir, checkpointing, rho_setting = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
load_in_4bit = sys.argv[4:] == ["4bit"]
plain = rho_setting == "plain"
rho = 0.0 if plain else float(rho_setting)
on_cuda = torch.cuda.is_available()
# Unsloth trains bf16 on a GPU (its kernels' dtype); fp32 on the CPU, where the comparison can be exact.
dtype = torch.bfloat16 if on_cuda else torch.float32
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

base = output_dir / "base"
if not base.exists():
    save_tiny_causal_lm(base, ["the cat sat on the mat", "a dog ran far"])


def unsloth_lora_model(checkpointing: str):
    """The same model every call: Unsloth's LoRA starts with B = 0, so B is drawn from a fixed generator to give
    every adapter weight a gradient."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(base), max_seq_length=64, dtype=dtype,
                                                         load_in_4bit=load_in_4bit)
    use = {"unsloth": "unsloth", "true": True, "false": False}[checkpointing]
    model = FastLanguageModel.get_peft_model(
        model, r=4, lora_alpha=8, lora_dropout=0.0, bias="none", random_state=0, use_gradient_checkpointing=use,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator).to(parameter))
    return model, tokenizer


model, tokenizer = unsloth_lora_model(checkpointing)
rows = Dataset.from_list([{"input_ids": row["input_ids"]} for row in token_rows(8)])
run_dir = output_dir / f"run-{checkpointing}-{rho_setting}{'-4bit' if load_in_4bit else ''}"
settings = training_args(run_dir, use_cpu=not on_cuda, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_steps=1, bf16=on_cuda, gradient_checkpointing=checkpointing != "false")
if plain:
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**settings), train_dataset=rows,
                             processing_class=tokenizer)
else:
    trainer = VaccineSFTTrainer(model=model, args=VaccineSFTConfig(**settings, rho=rho), train_dataset=rows,
                                processing_class=tokenizer)
loader = iter(trainer.get_train_dataloader())
batches = [next(loader) for _ in range(2)]  # sequential sampling: the step's two micro-batches
num_items = trainer._get_num_items_in_batch(batches, torch.device("cpu"))  # what the trainer divides by

before = trainable_state(trainer.model)
trainer.train()
after = trainable_state(trainer.model)
update = torch.cat([(after[n] - before[n]).flatten().float() for n in after])

reference = None
if not plain:
    copy, _ = unsloth_lora_model("false")  # the reference's hooks need the hidden states' own graph
    copy.train()
    device = next(copy.parameters()).device
    total = None
    for batch in batches:
        # Every tensor the trainer hands the model: on a GPU Unsloth may switch padding-free batches on, whose
        # position_ids mark where each row starts.
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            vaccine, _ = reference_gradients(copy, perturbed_modules(copy, "llama", "attention"), batch, rho,
                                             "global", num_items)
        grads = torch.cat([g.flatten().float() for g in vaccine.values()])
        total = grads if total is None else total + grads
    reference = (-LR * total).cpu().tolist()

print(json.dumps({
    "update": update.cpu().tolist(), "reference": reference,
    "trainer_classes": [cls.__module__ + "." + cls.__qualname__ for cls in type(trainer).__mro__],
    "checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
    "reentrant_found": bool(getattr(trainer, "_vaccine_reentrant_found", False)),
    "skipped_steps": getattr(trainer, "vaccine_skipped_steps", None),
    "logs": [{k: v for k, v in entry.items() if isinstance(v, (int, float))} for entry in trainer.state.log_history],
    "batch_keys": sorted(batches[0]), "num_items": int(num_items), "load_in_4bit": load_in_4bit,
    "quantized_modules": sum(type(m).__name__ == "Linear4bit" for m in trainer.model.modules()),
    "device": "cuda" if on_cuda else "cpu", "unsloth": unsloth.__version__,
}))
