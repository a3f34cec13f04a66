"""The step in the precisions users train in: real fp16 tensors with a real GradScaler, and bf16 end to end.

accelerate drops `fp16=True` on the CPU (no scaler, fp32 losses); the fp16 tests put a real
`torch.amp.GradScaler("cpu")` and fp16 autocast on the accelerator before training, which is what
accelerate does on a GPU, so pass 1 and pass 2 run on fp16 hidden states with a dynamic loss scale.
"""

from __future__ import annotations

import math

import pytest
import torch
from testing_utils import RHO, reference_update, relative_error, tiny_lora_model, token_rows, train, training_args
from torch import nn

import vaccine_trainer.trainer as trainer_module
from vaccine_trainer import VaccineTrainer, VaccineTrainingArguments, backend
from vaccine_trainer.perturbation import HiddenStateHooks, build_perturbation

def fp16_trainer(tmp_path, init_scale: float = 2.0 ** 10, **overrides) -> VaccineTrainer:
    args = VaccineTrainingArguments(**training_args(tmp_path, **overrides), fp16=True, rho=RHO)
    trainer = VaccineTrainer(model=tiny_lora_model(), args=args, train_dataset=token_rows(8))
    trainer.accelerator.native_amp = True  # fp16 autocast around model.forward, as accelerate does on a GPU
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return trainer


def attention_dtypes(trainer) -> list[torch.dtype]:
    seen = []
    attention = trainer.model.base_model.model.model.layers[0].self_attn
    attention.register_forward_hook(lambda module, args, output: seen.append(output[0].dtype))
    return seen


def test_fp16_with_a_real_grad_scaler_equals_the_fp32_reference(tmp_path):
    trainer = fp16_trainer(tmp_path)
    dtypes = attention_dtypes(trainer)
    update = train(trainer)
    assert set(dtypes) == {torch.float16}  # both passes ran on fp16 hidden states
    expected, plain = reference_update(token_rows(8)[:4])
    assert relative_error(update, expected) < 2e-2  # fp16 rounding
    assert relative_error(plain, expected) > 1.0
    logged = next(e for e in trainer.state.log_history if "vaccine/grad_norm" in e)
    # The scale is divided out of the logged norm: it is the fp32 figure within fp16 rounding.
    assert backend.loss_scale(trainer) == 2.0 ** 10
    assert logged["vaccine/perturbation_norm"] == pytest.approx(RHO, rel=1e-2)


def overflow_injected_at_step_one(monkeypatch, where: str):
    """Make the first step's pass 1 (hidden-state gradient) or pass 2 (loss) overflow, as a too large scale does."""
    state = {"step": 0}
    original_gradients = trainer_module.hidden_state_gradients
    original_loss = VaccineTrainer.compute_loss

    def gradients(loss, hooks, trainable=()):
        state["step"] += 1
        result = original_gradients(loss, hooks, trainable)
        return [g * math.inf for g in result] if where == "pass 1" and state["step"] == 1 else result

    def compute_loss(self, model, inputs, **kwargs):
        loss = original_loss(self, model, inputs, **kwargs)
        in_pass_two = self._vaccine_hooks.mode == "perturb"
        return loss * math.inf if where == "pass 2" and in_pass_two and state["step"] == 1 else loss

    monkeypatch.setattr(trainer_module, "hidden_state_gradients", gradients)
    monkeypatch.setattr(VaccineTrainer, "compute_loss", compute_loss)


@pytest.mark.parametrize("max_steps", [1, 2])
def test_a_pass_one_overflow_is_handled_as_the_scalers_own(tmp_path, monkeypatch, max_steps):
    """Step skipped, scale backed off, then the same training: exactly what the scaler does for a pass-2 overflow."""
    results = {}
    for where in ("pass 1", "pass 2"):
        with monkeypatch.context() as patch:
            overflow_injected_at_step_one(patch, where)
            trainer = fp16_trainer(tmp_path / where.replace(" ", ""), max_steps=max_steps)
            update = train(trainer)
        results[where] = (update, trainer.accelerator.scaler.get_scale(), trainer.vaccine_skipped_steps)
    (update, scale, skipped), (own_update, own_scale, _) = results["pass 1"], results["pass 2"]
    assert scale == own_scale == 2.0 ** 9  # backed off once (growth waits 2000 clean steps)
    assert skipped == 0  # not a micro-batch trained unperturbed: the step itself was skipped
    if max_steps == 1:
        assert torch.count_nonzero(update) == 0 and torch.count_nonzero(own_update) == 0
    else:
        assert torch.count_nonzero(update) > 0
        assert torch.equal(update, own_update)


def test_bf16_end_to_end_within_bf16_tolerance_with_the_applied_norm_logged(tmp_path):
    args = VaccineTrainingArguments(**training_args(tmp_path), bf16=True, rho=RHO)
    trainer = VaccineTrainer(model=tiny_lora_model(), args=args, train_dataset=token_rows(4))
    dtypes = attention_dtypes(trainer)
    update = train(trainer)
    assert set(dtypes) == {torch.bfloat16}
    expected, plain = reference_update(token_rows(4))
    assert relative_error(update, expected) < 0.1  # bf16 keeps 8 bits of mantissa
    assert relative_error(plain, expected) > 1.0
    logged = next(e for e in trainer.state.log_history if "vaccine/perturbation_norm" in e)
    assert logged["vaccine/perturbation_norm"] == pytest.approx(RHO, rel=0.05)  # small hidden states: little lost
    assert 0.5 < logged["vaccine/perturbation_kept"] <= 1.01


@pytest.mark.parametrize("norm, rho", [("global", 1e-3), ("relative", 1e-4)])
def test_bf16_autocast_over_fp32_weights_keeps_eps_whole_and_bf16_weights_round_it(tmp_path, norm, rho):
    """A perturbation far below bf16's spacing of the hidden states: under autocast the attention block returns bf16
    but its input, the residual stream, is fp32, so eps is added in fp32 and kept whole; with bf16 weights the
    stream itself is bf16 and rounding takes most of it (the measured negative control)."""
    def kept(model, tag: str) -> float:
        args = VaccineTrainingArguments(**training_args(tmp_path / tag), bf16=True, rho=rho, vaccine_norm=norm)
        trainer = VaccineTrainer(model=model, args=args, train_dataset=token_rows(4))
        outputs = []
        layer = trainer.model.base_model.model.model.layers[0]
        layer.register_forward_hook(lambda module, args, output: outputs.append(output.dtype))
        train(trainer)
        assert set(outputs) == {next(model.parameters()).dtype}  # the residual stream keeps the weights' dtype
        key = "vaccine/perturbation_kept"
        return next(e for e in trainer.state.log_history if key in e)[key]

    assert kept(tiny_lora_model(), "fp32-weights") >= 0.99
    assert kept(tiny_lora_model().to(torch.bfloat16), "bf16-weights") < 0.5


class Constant(nn.Module):
    def __init__(self, value: float, dtype: torch.dtype):
        super().__init__()
        self.value, self.dtype = value, dtype

    def forward(self, x):
        return torch.full((2, 3), self.value, dtype=self.dtype)


@pytest.mark.parametrize("eps, applied_per_element", [(0.5, 0.0), (1.5, 2.0), (4.0, 4.0)])
def test_the_applied_norm_is_what_bf16_rounding_keeps(eps, applied_per_element):
    """Around 256, bf16 numbers are 2 apart: +0.5 is rounded away, +1.5 becomes +2, +4 stays +4."""
    module = Constant(256.0, torch.bfloat16)
    hooks = HiddenStateHooks([module])
    with hooks.installed_for(), hooks.perturbing([torch.full((2, 3), eps, dtype=torch.bfloat16)]):
        out = module(None)
        assert torch.all(out == 256.0 + applied_per_element)
        assert hooks.applied_norm().item() == pytest.approx(applied_per_element * math.sqrt(6))
    assert hooks.applied_norm() is None  # reset when the pass ends


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eps_is_built_in_place_with_one_rounding(dtype):
    gradients = [torch.randn(4, 8, 16).to(dtype), torch.randn(4, 8, 16).to(dtype)]
    expected_norm = math.sqrt(sum(torch.linalg.vector_norm(g, dtype=torch.float32).item() ** 2 for g in gradients))
    by_hand = [g.float().mul_(RHO / expected_norm).to(dtype) for g in gradients]
    storage = [g.untyped_storage().data_ptr() for g in gradients]
    result = build_perturbation(gradients, RHO)
    assert [e.untyped_storage().data_ptr() for e in result.eps] == storage  # no second hidden-sized copy
    assert all(torch.equal(e, h) for e, h in zip(result.eps, by_hand))


def test_the_kept_fraction_is_the_median_over_layers_of_added_over_intended():
    """Two outputs, around 256 and around 1 in bf16: the first keeps nothing of +0.5, the second all of it."""
    modules = [Constant(256.0, torch.bfloat16), Constant(1.0, torch.bfloat16), Constant(1.0, torch.bfloat16)]
    hooks = HiddenStateHooks(modules)
    eps = [torch.full((2, 3), 0.5, dtype=torch.bfloat16) for _ in modules]
    norm = 0.5 * math.sqrt(6)
    with hooks.installed_for(), hooks.perturbing(eps):
        for module in modules:
            module(None)
        assert hooks.kept_fraction_median([norm, norm, norm]).item() == pytest.approx(1.0)  # kept: 0, 1, 1
        assert hooks.kept_fraction_median([norm, None, norm]).item() == pytest.approx(0.0)  # lower middle of 0, 1
