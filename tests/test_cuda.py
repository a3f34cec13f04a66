"""The step where users run it, on a CUDA device: bf16 and fp16 (accelerate's own GradScaler), inductor-compiled,
TRL activation offloading, QLoRA 4-bit, DeepSpeed fp16, and batched generation for `evaluate`.

Every update is compared with the independent fp32 reference of `test_reference` computed on the CPU. These tests
skip on a machine without CUDA (CI); `tests/test_precision.py` and `tests/test_compile.py` cover the same paths on
the CPU with real fp16/bf16 tensors and CPU compile backends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import (
    RHO, reference_update, relative_error, save_tiny_causal_lm, tiny_lora_model, tiny_model, tiny_tokenizer,
    token_rows, train, training_args,
)

from vaccine_trainer import VaccineSFTConfig, VaccineSFTTrainer, VaccineTrainer, VaccineTrainingArguments

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would round fp32 matmuls to 10 mantissa bits: the fp32 comparisons need true fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_args(tmp_path, **overrides) -> VaccineTrainingArguments:
    return VaccineTrainingArguments(**training_args(tmp_path, use_cpu=False, **overrides), rho=RHO)


def logged(trainer, key: str) -> float:
    return next(e[key] for e in trainer.state.log_history if key in e)


def hooked_output_dtypes(trainer) -> set[tuple[str, torch.dtype]]:
    seen = set()
    for layer in trainer.model.base_model.model.model.layers:
        layer.self_attn.register_forward_hook(
            lambda module, args, output: seen.add((trainer.vaccine_hooks.mode, output[0].dtype)))
    return seen


def test_fp32_on_cuda_equals_the_reference(tmp_path):
    trainer = VaccineTrainer(model=tiny_lora_model(), args=cuda_args(tmp_path), train_dataset=token_rows(4))
    update = train(trainer).cpu()
    expected, plain = reference_update(token_rows(4))
    assert relative_error(update, expected) < 1e-5
    assert relative_error(plain, expected) > 1.0


def test_bf16_on_cuda_within_bf16_tolerance(tmp_path):
    trainer = VaccineTrainer(model=tiny_lora_model(), args=cuda_args(tmp_path, bf16=True), train_dataset=token_rows(4))
    dtypes = hooked_output_dtypes(trainer)
    update = train(trainer).cpu()
    assert {dtype for _, dtype in dtypes} == {torch.bfloat16}
    assert {mode for mode, _ in dtypes} == {"capture", "perturb"}
    expected, plain = reference_update(token_rows(4))
    assert relative_error(update, expected) < 0.1
    assert relative_error(plain, expected) > 1.0
    assert logged(trainer, "vaccine/perturbation_norm") == pytest.approx(RHO, rel=0.05)


def test_fp16_on_cuda_with_accelerates_own_grad_scaler(tmp_path):
    trainer = VaccineTrainer(model=tiny_lora_model(), args=cuda_args(tmp_path, fp16=True),
                             train_dataset=token_rows(4))
    assert trainer.accelerator.scaler is not None  # accelerate made it: nothing set by hand, unlike on the CPU
    dtypes = hooked_output_dtypes(trainer)
    update = train(trainer).cpu()
    assert {dtype for _, dtype in dtypes} == {torch.float16}
    expected, plain = reference_update(token_rows(4))
    assert relative_error(update, expected) < 2e-2
    assert relative_error(plain, expected) > 1.0
    assert logged(trainer, "vaccine/perturbation_norm") == pytest.approx(RHO, rel=1e-2)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inductor_compiled_on_cuda_equals_eager(tmp_path, precision):
    # `torch_compile=True` makes TrainingArguments switch TF32 on for the whole process unless `tf32=False` is given
    # (transformers' own speed default): the fp32 case asks for true fp32, as a user comparing precisions would.
    flags = {"bf16": True} if precision == "bf16" else {"tf32": False}
    eager = VaccineTrainer(model=tiny_lora_model(), args=cuda_args(tmp_path / "eager", **flags),
                           train_dataset=token_rows(4))
    eager_update = train(eager).cpu()
    compiled = VaccineTrainer(model=tiny_lora_model(), args=cuda_args(tmp_path / "compiled", torch_compile=True,
                                                                      torch_compile_backend="inductor", **flags),
                              train_dataset=token_rows(4))
    compiled_update = train(compiled).cpu()
    expected, plain = reference_update(token_rows(4))
    tolerance = 1e-4 if precision == "fp32" else 0.1
    assert relative_error(compiled_update, expected) < tolerance
    assert relative_error(compiled_update, eager_update) < tolerance
    assert relative_error(plain, expected) > 1.0  # a compiled run that fell back to plain SFT would fail above


def sft_update(tmp_path, offload: bool) -> torch.Tensor:
    from datasets import Dataset

    args = VaccineSFTConfig(**training_args(tmp_path, use_cpu=False), bf16=False, gradient_checkpointing=False,
                            activation_offloading=offload, rho=RHO)
    rows = Dataset.from_list([{"input_ids": row["input_ids"]} for row in token_rows(4)])
    trainer = VaccineSFTTrainer(model=tiny_lora_model(), args=args, train_dataset=rows,
                                processing_class=tiny_tokenizer())
    return train(trainer).cpu()


def test_trl_activation_offloading_on_equals_off(tmp_path):
    off = sft_update(tmp_path / "off", offload=False)
    on = sft_update(tmp_path / "on", offload=True)
    assert relative_error(on, off) < 1e-6
    expected, _ = reference_update(token_rows(4))
    assert relative_error(off, expected) < 1e-5


def test_qlora_4bit_on_cuda_perturbs_and_trains(tmp_path):
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = pytest.importorskip("bitsandbytes")
    tiny_model("llama").save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)

    def qlora():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization,
                                                     device_map={"": 0}, dtype=torch.bfloat16)
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return peft.get_peft_model(model, peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM", init_lora_weights=False))

    rows = token_rows(4)
    updates = {}
    for rho in (RHO, 0.0):
        args = VaccineTrainingArguments(**training_args(tmp_path / f"rho{rho}", use_cpu=False, bf16=True),
                                        rho=rho)
        trainer = VaccineTrainer(model=qlora(), args=args, train_dataset=rows)
        updates[rho] = train(trainer).cpu().float()
        assert torch.isfinite(updates[rho]).all() and torch.count_nonzero(updates[rho]) > 0
        if rho:
            assert logged(trainer, "vaccine/perturbation_norm") == pytest.approx(RHO, rel=0.05)
    assert relative_error(updates[RHO], updates[0.0]) > 1e-3  # the perturbation reached the 4-bit model


def test_deepspeed_zero2_fp16_on_cuda_equals_the_reference(tmp_path):
    pytest.importorskip("deepspeed")
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(HERE / "deepspeed_cuda_worker.py"), str(tmp_path), "29731"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    update = torch.tensor(report["update"])
    expected, plain = reference_update(token_rows(4))
    assert report["loss_scale_in_pass_one"] == 2.0 ** 10  # DeepSpeed's dynamic scale, read by pass 1
    assert report["dtypes"] == [["capture", "torch.float16"], ["perturb", "torch.float16"]]
    assert relative_error(update, expected) < 2e-2
    assert relative_error(plain, expected) > 1.0


def test_batched_generation_on_cuda_gives_the_one_by_one_answers(tmp_path):
    from transformers import AutoTokenizer

    from vaccine_harness.commands.evaluate import load_evaluated_model
    from vaccine_harness.evaluation.generation import generate_answers

    texts = ["the cat sat on the mat", "a dog ran far", "why", "tell me a very long story about the sea and sky"]
    save_tiny_causal_lm(tmp_path / "model", texts)
    model = load_evaluated_model(str(tmp_path / "model"))
    assert model.device.type == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    batched = generate_answers(model, tokenizer, texts, batch_size=4, max_new_tokens=8, show_progress=False)
    one_by_one = generate_answers(model, tokenizer, texts, batch_size=1, max_new_tokens=8, show_progress=False)
    assert batched == one_by_one
    assert all(batched)
