"""One VaccineTrainer step against an independent computation of the paper's formula.

The reference below uses its own hooks on hand-written module paths (conftest.LAYER_PATHS):
pass 1 takes g_l = dL/de_l, eps_l = rho * g_l / ||g|| (global), rho * g_l / ||g_l|| (per layer) or
rho * ||h_t|| * g_t / ||g_t|| for every token t of every layer (relative),
pass 2 adds eps_l to e_l and backpropagates; SGD with lr gives the expected update.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    LAYER_PATHS, TINY_CONFIGS, relative_error, tiny_lora_model, tiny_model, token_rows, trainable_state,
    training_args,
)
from transformers import TrainingArguments
from transformers.data.data_collator import default_data_collator

from vaccine_trainer import VaccineTrainer, VaccineTrainingArguments

LR = 0.5
RHO = 2.0
RHOS = {"global": RHO, "layer": RHO, "relative": 0.05}  # relative: a fraction of each hidden state's size


def perturbed_modules(model, arch: str, target: str) -> list[torch.nn.Module]:
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    layers_path, attention_name = LAYER_PATHS[arch]
    layers = model.get_submodule(layers_path)
    return [layer.get_submodule(attention_name) if target == "attention" else layer for layer in layers]


def first(output):
    return output[0] if isinstance(output, tuple) else output


def reference_gradients(model, modules, batch, rho: float, norm: str, num_items=None):
    """Parameter gradients of the Vaccine loss, and of the plain loss, by the paper's formula.

    `num_items` is the token count the Trainer divides the summed loss by (for GPT-2, transformers
    5 counts unshifted labels); None uses the model's own mean.
    """
    if num_items is not None:
        batch = {**batch, "num_items_in_batch": num_items}
    captured = []
    handles = [m.register_forward_hook(lambda mod, args, out: captured.append(first(out))) for m in modules]
    try:
        loss = model(**batch).loss
    finally:
        for handle in handles:
            handle.remove()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, captured + params)
    hidden_grads, plain_grads = grads[: len(captured)], grads[len(captured):]
    if norm == "global":
        total = torch.sqrt(sum((g.double() ** 2).sum() for g in hidden_grads))
        eps = [(rho * g.double() / total).float() for g in hidden_grads]
    elif norm == "relative":  # eps_t = rho * ||h_t|| * g_t / ||g_t|| per token, none where g_t = 0
        eps = []
        for h, g in zip(captured, hidden_grads):
            g_t = g.double().norm(dim=-1, keepdim=True)
            h_t = h.detach().double().norm(dim=-1, keepdim=True)
            eps.append(torch.where(g_t > 0, rho * h_t * g.double() / g_t, torch.zeros_like(g_t)).float())
    else:
        eps = [(rho * g.double() / g.double().norm()).float() for g in hidden_grads]

    def add_eps(index):
        def hook(mod, args, out):
            if isinstance(out, tuple):
                return (out[0] + eps[index],) + out[1:]
            return out + eps[index]
        return hook

    handles = [m.register_forward_hook(add_eps(i)) for i, m in enumerate(modules)]
    try:
        perturbed_loss = model(**batch).loss
    finally:
        for handle in handles:
            handle.remove()
    vaccine_grads = torch.autograd.grad(perturbed_loss, params)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return dict(zip(names, vaccine_grads)), dict(zip(names, plain_grads))


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
