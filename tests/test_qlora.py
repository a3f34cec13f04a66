"""4-bit (bitsandbytes nf4) QLoRA trains with Vaccine on the CPU."""

from __future__ import annotations

import pytest
import torch
from testing_utils import FAST, finetune_argv, tiny_model, token_rows, trainable_state, training_args


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


def _alignment_adapter(folder, scale: float = 0.5):
    """A stand-in stage-1 adapter whose weights matter (LoRA B is not zero), saved as `align` saves one."""
    import peft

    torch.manual_seed(1)
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM",
        init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale / parameter.abs().max())
    model.save_pretrained(folder)
    return folder


def _stage2_update(tmp_path, base, alignment, tag, **config):
    from vaccine_trainer import AlignedSFTConfig, AlignedSFTTrainer

    args = AlignedSFTConfig(**{**training_args(tmp_path / tag, max_steps=1), "lora_r": 4, "lora_alpha": 8.0,
                               "lora_dropout": 0.0, "lora_target_modules": ["q_proj", "v_proj"], **config})
    from datasets import Dataset

    from testing_utils import tiny_tokenizer

    rows = Dataset.from_list([{"text": t} for t in ["i can not help with that .", "how do i steal a car ?"] * 2])
    trainer = AlignedSFTTrainer(base, args, train_dataset=rows, alignment_adapter=str(alignment),
                                processing_class=tiny_tokenizer())
    with torch.no_grad():  # the same fresh A matrices in every trainer, however it drew them (B starts at zero)
        fresh = sorted((n, p) for n, p in trainer.model.named_parameters() if "lora_A.default" in n)
        for index, (name, parameter) in enumerate(fresh):
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(index)) * 0.3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before and all(".alignment." not in n for n in before)  # only the fresh adapter trains
    return torch.cat([(after[n].detach() - before[n]).flatten() for n in sorted(before)]), trainer


def test_stage2_on_a_4bit_base_keeps_the_alignment_adapter_beside_and_matches_the_unquantised_step(tmp_path):
    from testing_utils import relative_error
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama").save_pretrained(tmp_path / "base")
    alignment = _alignment_adapter(tmp_path / "aligned")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    four_bit = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization,
                                                    device_map="cpu", dtype=torch.float32)
    quantized, trainer = _stage2_update(tmp_path, four_bit, alignment, "4bit")
    assert sorted(trainer.model.peft_config) == ["alignment", "default"]
    unquantized, _ = _stage2_update(tmp_path, AutoModelForCausalLM.from_pretrained(tmp_path / "base"), alignment,
                                    "fp32-unmerged", merge_alignment=False)
    merged, _ = _stage2_update(tmp_path, AutoModelForCausalLM.from_pretrained(tmp_path / "base"), alignment,
                               "fp32-merged")
    without, _ = _stage2_update(tmp_path, AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                _alignment_adapter(tmp_path / "none", scale=1e-6), "fp32-no-alignment")
    assert relative_error(unquantized, merged) < 1e-4  # unmerged is the same model as merged
    error = relative_error(quantized, unquantized)
    # What nf4 alone does to this step: the same comparison with an alignment adapter of no effect.
    weak = _alignment_adapter(tmp_path / "weak", scale=1e-6)
    four_bit_weak = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization,
                                                         device_map="cpu", dtype=torch.float32)
    nf4_noise = relative_error(_stage2_update(tmp_path, four_bit_weak, weak, "4bit-weak")[0], without)
    print(f"4-bit vs unquantised: {error:.3f} with the alignment adapter, {nf4_noise:.3f} without; "
          f"without vs with the adapter: {relative_error(without, unquantized):.3f}")
    assert error < 1.5 * nf4_noise  # within what 4-bit rounding does to the same step anyway
    assert relative_error(without, unquantized) > 2 * error  # negative control: the alignment adapter matters


def test_finetune_load_in_4bit_runs_two_steps_and_its_output_loads(workspace, tmp_path):
    """`vaccine-trainer finetune --load_in_4bit true`: the alignment adapter beside the new one over a 4-bit base,
    drift measured against the aligned model (base + alignment adapter), and the output loads as a stage-2 output."""
    import json


    from vaccine_trainer import load_finetuned_model
    from vaccine_trainer.cli import main

    aligned = tmp_path / "aligned"
    assert main(["align", "--model_name_or_path", workspace["model"], "--dataset", workspace["alignment"],
                 "--num_samples", "4", "--rho", "2", "--output_dir", str(aligned), *FAST]) == 0
    out = tmp_path / "finetuned"
    assert main([*finetune_argv(workspace, str(aligned), out), "--load_in_4bit", "true", "--max_steps", "2"]) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    drift = [log["alignment/drift"] for log in history if "alignment/drift" in log]
    assert drift[0] == 0.0 and drift[-1] > 0  # measured from the aligned model, which the new adapter moves
    model = load_finetuned_model(out)
    assert not any("lora" in name for name, _ in model.named_parameters())  # plain weights, both adapters merged


def _linear_4bit():
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64, bias=False)  # big enough for bitsandbytes' CPU inference layout
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def _input_gradient(layer):
    layer.train()
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1), requires_grad=True)
    layer(x).square().sum().backward()
    return x.grad


def _eval_forward(layer):
    layer.eval()
    with torch.no_grad():
        layer(torch.ones(2, 128))


def test_an_eval_forward_in_training_leaves_4bit_layers_trainable():
    """The drift measurement's eval forward mid-training: the 4-bit layer still passes its input's gradient on,
    unchanged. Without the guard, on a CPU with AVX512-BF16, bitsandbytes repacks the weight for inference and the
    gradient is lost (negative control, run where the CPU repacks)."""
    from bitsandbytes.functional import has_avx512bf16

    from vaccine_trainer.quantized_layout import trainable_4bit_layout

    layer = _linear_4bit()
    reference = _input_gradient(layer)
    with trainable_4bit_layout(layer):
        _eval_forward(layer)
        assert torch.equal(_input_gradient(layer), reference)
    assert layer.support_avx512bf16_for_cpu == has_avx512bf16()  # left as found
    if has_avx512bf16():
        _eval_forward(layer)
        assert _input_gradient(layer) is None


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights on AVX512-BF16 "
                    "CPUs only")
def test_a_4bit_weight_repacked_before_training_is_restored(caplog):
    """Inference before `train` already repacked the weight: training restores the layout that trains (the scales
    rounded to bf16 by the repacking, so close to, not equal to, the original gradient) and says so."""
    from vaccine_trainer.quantized_layout import trainable_4bit_layout

    layer = _linear_4bit()
    reference = _input_gradient(layer)
    _eval_forward(layer)
    with caplog.at_level("WARNING"), trainable_4bit_layout(layer):
        restored = _input_gradient(layer)
    assert restored is not None and ((restored - reference).norm() / reference.norm()).item() < 1e-2
    assert "restored to the layout that trains" in caplog.text
