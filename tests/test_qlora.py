"""4-bit (bitsandbytes nf4) QLoRA trains with Vaccine on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_rows, trainable_state, training_args

from vaccine_trainer import VaccineTrainer, VaccineTrainingArguments

bnb = pytest.importorskip("bitsandbytes")


def test_nf4_qlora_trains_a_few_steps(tmp_path):
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama").save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization,
                                                 device_map="cpu", dtype=torch.float32)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM"))
    before = trainable_state(model)
    args = VaccineTrainingArguments(**training_args(tmp_path / "out", max_steps=3, optim="adamw_torch",
                                                    learning_rate=1e-2), rho=2.0)
    trainer = VaccineTrainer(model=model, args=args, train_dataset=token_rows(4))
    trainer.train()
    after = trainable_state(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in after)
    norms = [e["vaccine/grad_norm"] for e in trainer.state.log_history if "vaccine/grad_norm" in e]
    assert len(norms) == 3 and all(n > 0 for n in norms)
