"""One VaccineTrainer step against an independent computation of the paper's formula.

The reference below uses its own hooks on hand-written module paths (conftest.LAYER_PATHS):
pass 1 takes g_l = dL/de_l, eps_l = rho * g_l / ||g|| (global), rho * g_l / ||g_l|| (per layer) or
rho * ||h_t|| * g_t / ||g_t|| for every token t of every layer (relative),
pass 2 adds eps_l to e_l and backpropagates; SGD with lr gives the expected update.
"""

from __future__ import annotations

import pytest
import torch
from testing_utils import (
    LR, RHOS, TINY_CONFIGS, first, perturbed_modules, reference_gradients, relative_error, tiny_lora_model,
    tiny_model, token_rows, trainable_state, training_args,
)
from transformers import TrainingArguments
from transformers.data.data_collator import default_data_collator

from vaccine_trainer import VaccineTrainer, VaccineTrainingArguments

def build(arch: str, lora: bool):
    return tiny_lora_model(arch) if lora else tiny_model(arch)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("norm", ["global", "layer", "relative"])
@pytest.mark.parametrize("target", ["attention", "layer"])
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_one_step_matches_reference(tmp_path, arch, target, norm, lora):
    rows = token_rows(4)
    batch = default_data_collator(rows)

    model = build(arch, lora)
    before = trainable_state(model)
    args = VaccineTrainingArguments(**training_args(tmp_path), rho=RHOS[norm], vaccine_target=target,
                                    vaccine_norm=norm)
    trainer = VaccineTrainer(model=model, args=args, train_dataset=rows)
    num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))

    reference_model = build(arch, lora).train()
    expected, plain = reference_gradients(
        reference_model, perturbed_modules(reference_model, arch, target), batch, RHOS[norm], norm, num_items
    )
    assert len(trainer.vaccine_modules) == len(perturbed_modules(model, arch, target))
    trainer.train()

    after = trainable_state(model)
    assert after.keys() == expected.keys()
    update = torch.cat([(after[n] - before[n]).flatten() for n in after])
    want = torch.cat([(-LR * expected[n]).flatten() for n in after])
    plain_update = torch.cat([(-LR * plain[n]).flatten() for n in after])
    assert relative_error(update, want) < 1e-5
    # The check can fail: the perturbation changes the update far beyond the tolerance.
    assert relative_error(plain_update, want) > 1e-3


def test_relative_norm_is_per_token_not_per_layer(tmp_path):
    """Negative control of the relative reference: scaling by each layer's whole norm instead of each token's own
    (eps_l = rho * ||h_l|| * g_l / ||g_l||) gives another update, so the reference test tells the two apart."""
    rows = token_rows(4)
    batch = default_data_collator(rows)
    reference_model = tiny_lora_model("llama").train()
    modules = perturbed_modules(reference_model, "llama", "attention")
    expected, _ = reference_gradients(reference_model, modules, batch, 0.05, "relative")
    captured = []
    handles = [m.register_forward_hook(lambda mod, args, out: captured.append(first(out))) for m in modules]
    loss = reference_model(**batch).loss
    for handle in handles:
        handle.remove()
    grads = torch.autograd.grad(loss, captured)
    per_layer = [0.05 * h.detach().norm() * g / g.norm() for h, g in zip(captured, grads)]
    handles = [m.register_forward_hook(lambda mod, args, out, e=e: (out[0] + e, *out[1:]) if isinstance(out, tuple)
                                       else out + e) for m, e in zip(modules, per_layer)]
    params = [p for p in reference_model.parameters() if p.requires_grad]
    layer_wide = torch.autograd.grad(reference_model(**batch).loss, params)
    for handle in handles:
        handle.remove()
    assert relative_error(torch.cat([g.flatten() for g in layer_wide]),
                          torch.cat([g.flatten() for g in expected.values()])) > 1e-3


def test_plain_arguments_with_keyword_rho(tmp_path):
    """Swapping the class name is enough: plain TrainingArguments plus rho=..."""
    rows = token_rows(4)
    batch = default_data_collator(rows)
    reference_model = tiny_lora_model("llama").train()
    expected, _ = reference_gradients(
        reference_model, perturbed_modules(reference_model, "llama", "attention"), batch, 1.5, "global"
    )
    model = tiny_lora_model("llama")
    before = trainable_state(model)
    trainer = VaccineTrainer(model=model, args=TrainingArguments(**training_args(tmp_path)),
                             train_dataset=rows, rho=1.5)
    assert trainer.vaccine_args.rho == 1.5
    trainer.train()
    after = trainable_state(model)
    update = torch.cat([(after[n] - before[n]).flatten() for n in after])
    want = torch.cat([(-LR * expected[n]).flatten() for n in after])
    assert relative_error(update, want) < 1e-5
