"""The step inside the Trainer: accumulation, checkpointing, rho=0, gaussian, hooks, compile, QLoRA."""

from __future__ import annotations

import pytest
import torch
from testing_utils import (
    LR, PROBE, PassOneGradientFault, flat, make_trainer, perturbed_modules, reference_gradients, relative_error, run,
    tiny_lora_model, tiny_model, token_rows, trainable_state, training_args,
)
from transformers import Trainer
from transformers.data.data_collator import default_data_collator

from vaccine_trainer import VaccineTrainer, VaccineTrainingArguments, backend


def test_gradient_accumulation_keeps_every_micro_batch(tmp_path):
    rows = token_rows(4)
    update, _ = run(tiny_lora_model(), tmp_path, rows, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2)
    per_micro_batch = []
    for part in (rows[:2], rows[2:]):
        model = tiny_lora_model().train()
        grads, _ = reference_gradients(model, perturbed_modules(model, "llama", "attention"),
                                       default_data_collator(part), 2.0, "global")
        per_micro_batch.append(-LR * flat(grads))
    expected = (per_micro_batch[0] + per_micro_batch[1]) / 2
    assert relative_error(update, expected) < 1e-5
    assert relative_error(update, per_micro_batch[1] / 2) > 0.1  # a wiped first micro-batch would show


@pytest.mark.parametrize("target", ["attention", "layer"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_gradient_checkpointing_gives_the_same_update(tmp_path, target, reentrant, lora):
    build = tiny_lora_model if lora else tiny_model
    rows = token_rows(4)
    plain, _ = run(build(), tmp_path / "a", rows, vaccine_target=target)
    checkpointed, _ = run(build(), tmp_path / "b", rows, vaccine_target=target, activation_checkpointing=True,
                          activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert relative_error(checkpointed, plain) < 1e-5
    assert relative_error(unperturbed_update(lora, tmp_path / "c"), plain) > 1e-3


_UNPERTURBED: dict[bool, torch.Tensor] = {}


def unperturbed_update(lora: bool, tmp_path) -> torch.Tensor:
    """The negative control (rho = 0) of the checkpointing test: one run per model kind, not one per case."""
    if lora not in _UNPERTURBED:
        _UNPERTURBED[lora] = run((tiny_lora_model if lora else tiny_model)(), tmp_path, token_rows(4), rho=0.0)[0]
    return _UNPERTURBED[lora]


def test_rho_zero_is_exactly_the_plain_trainer(tmp_path):
    rows = token_rows(4)
    vaccine, trainer = run(tiny_lora_model(), tmp_path / "v", rows, rho=0.0, max_steps=2)
    plain, _ = run(tiny_lora_model(), tmp_path / "p", rows, trainer_class=Trainer, max_steps=2)
    assert torch.equal(vaccine, plain)
    assert trainer.vaccine_modules == []


def test_gaussian_is_reproducible_under_a_seed(tmp_path):
    rows = token_rows(4)
    first, _ = run(tiny_lora_model(), tmp_path / "a", rows, vaccine_perturbation="gaussian", rho=0.5, seed=3)
    again, _ = run(tiny_lora_model(), tmp_path / "b", rows, vaccine_perturbation="gaussian", rho=0.5, seed=3)
    other, _ = run(tiny_lora_model(), tmp_path / "c", rows, vaccine_perturbation="gaussian", rho=0.5, seed=4)
    plain, _ = run(tiny_lora_model(), tmp_path / "d", rows, rho=0.0, seed=3)
    assert torch.equal(first, again)
    assert relative_error(first, other) > 1e-3
    assert relative_error(first, plain) > 1e-3


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_no_hooks_left_after_train_and_after_a_failed_step(tmp_path):
    model = tiny_lora_model()
    baseline = _hook_count(model)
    _, trainer = run(model, tmp_path, token_rows(4), max_steps=2)
    assert _hook_count(model) == baseline

    calls = {"n": 0}
    original = trainer.compute_loss

    def failing_compute_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # pass 2 of the step
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    trainer.compute_loss = failing_compute_loss
    batch = default_data_collator(token_rows(2))
    grads_before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer.training_step(model, batch)
    assert _hook_count(model) == baseline
    assert trainer._vaccine_hooks.mode == "off" and not any(o is not None for o in trainer._vaccine_hooks.outputs)
    for name, param in model.named_parameters():  # pass 1 touched no gradient
        before = grads_before[name]
        assert (param.grad is None and before is None) or torch.equal(param.grad, before)
    trainer.compute_loss = original
    loss = trainer.training_step(model, batch)  # the same trainer goes on
    assert torch.isfinite(loss)


def clean_loss_and_hidden_gradient_norm(model, rows, layers) -> tuple[float, float]:
    """By hand: the unperturbed loss of one batch and the global norm of d loss / d (attention outputs)."""
    captured = []
    handles = [model.base_model.model.model.layers[i].self_attn.register_forward_hook(
        lambda module, args, output: captured.append(output[0])) for i in layers]
    batch = {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}
    model.train()
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, captured)
    for handle in handles:
        handle.remove()
    return loss.item(), torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()


def test_modules_are_reported_and_logged(tmp_path, caplog):
    import copy
    import logging

    caplog.set_level(logging.INFO, logger="vaccine_trainer")
    model = tiny_lora_model()
    untrained = copy.deepcopy(model)
    rows = token_rows(8)
    _, trainer = run(model, tmp_path, rows, max_steps=2, vaccine_layers="1-2")
    assert trainer.vaccine_modules == [
        "base_model.model.model.layers.1.self_attn", "base_model.model.model.layers.2.self_attn"]
    assert "perturbs the outputs of 2 modules" in caplog.text and "layers.2.self_attn" in caplog.text
    logged = [entry for entry in trainer.state.log_history if "vaccine/grad_norm" in entry]
    assert len(logged) == 2
    assert all(entry["vaccine/skipped_steps"] == 0 for entry in logged)
    # Step 1's pass 1 sees the first batch and the untrained weights: its loss and hidden-gradient norm, by hand.
    clean, norm = clean_loss_and_hidden_gradient_norm(untrained, rows[:4], [1, 2])
    assert logged[0]["vaccine/clean_loss"] == pytest.approx(clean, rel=1e-5)
    assert logged[0]["vaccine/grad_norm"] == pytest.approx(norm, rel=1e-4)
    # ...and the logged loss is the perturbed one, which differs
    assert logged[0]["vaccine/clean_loss"] != pytest.approx(trainer.state.log_history[0]["loss"], rel=1e-6)


def test_logged_values_average_the_micro_batches(tmp_path):
    """With gradient accumulation, clean loss and norm are the means over the window's micro-batches."""
    import copy

    model = tiny_lora_model()
    untrained = copy.deepcopy(model)
    rows = token_rows(8)
    _, trainer = run(model, tmp_path, rows, max_steps=1, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, vaccine_layers="0")
    by_hand = [clean_loss_and_hidden_gradient_norm(untrained, rows[i:i + 2], [0]) for i in (0, 2)]
    entry = next(e for e in trainer.state.log_history if "vaccine/grad_norm" in e)
    assert entry["vaccine/clean_loss"] == pytest.approx(sum(c for c, _ in by_hand) / 2, rel=1e-5)
    # The norm of each micro-batch's loss as the Trainer scales it for accumulation (loss / 2).
    assert entry["vaccine/grad_norm"] == pytest.approx(sum(n for _, n in by_hand) / 2 / 2, rel=1e-4)


def test_compiled_model_keeps_the_perturbation(tmp_path):
    rows = token_rows(4)
    eager, _ = run(tiny_lora_model(), tmp_path / "a", rows)
    compiled, _ = run(tiny_lora_model(), tmp_path / "b", rows, torch_compile=True, torch_compile_backend="eager")
    assert relative_error(compiled, eager) < 1e-5


def test_model_compiled_before_the_trainer_fails_loudly_or_perturbs(tmp_path):
    """A model compiled and run before the hooks exist must never train silently unperturbed."""
    rows = token_rows(4)
    eager, _ = run(tiny_lora_model(), tmp_path / "a", rows)
    model = tiny_lora_model()
    compiled = torch.compile(model, backend="eager")
    compiled(**default_data_collator(rows))  # first compiled call, before any Vaccine hook exists
    try:
        update, _ = run(compiled, tmp_path / "b", rows, remove_unused_columns=False)
    except RuntimeError as error:
        assert "did not run" in str(error)
    else:
        assert relative_error(update, eager) < 1e-5


def test_dataparallel_is_refused_with_a_pointer_to_accelerate(tmp_path, monkeypatch):
    monkeypatch.setattr(VaccineTrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match="accelerate launch"):
        VaccineTrainer(model=tiny_lora_model(), args=VaccineTrainingArguments(**training_args(tmp_path)),
                       train_dataset=token_rows(4))


def test_gaussian_noise_has_the_official_variance_rho(tmp_path, monkeypatch):
    """The official ablation draws N(0, rho) (std sqrt(rho)), not std rho: check the noise actually added."""
    import vaccine_trainer.trainer as trainer_module

    added = []
    original = trainer_module.gaussian_noise

    def recording(std):
        noise = original(std)

        def draw(hidden):
            sample = noise(hidden)
            added.append(sample.detach().flatten())
            return sample

        return draw

    monkeypatch.setattr(trainer_module, "gaussian_noise", recording)
    rows = token_rows(8, length=16)
    run(tiny_lora_model(), tmp_path, rows, vaccine_perturbation="gaussian", rho=4.0, max_steps=2)
    samples = torch.cat(added)
    assert samples.numel() > 2000
    assert samples.std().item() == pytest.approx(2.0, rel=0.05)  # sqrt(4); std = rho would give 4
    assert abs(samples.mean().item()) < 0.1


def test_logged_norm_divides_the_amp_loss_scale_out(tmp_path, monkeypatch):
    """Pass 1 scales the loss like AMP does (fp16 gradients underflow); the log and the update must not change."""
    rows = token_rows(4)
    plain_update, plain = run(tiny_lora_model(), tmp_path / "a", rows, max_steps=1)
    monkeypatch.setattr(backend, "loss_scale", lambda trainer: 1024.0)
    scaled_update, scaled = run(tiny_lora_model(), tmp_path / "b", rows, max_steps=1)

    def norm(trainer):
        return next(e["vaccine/grad_norm"] for e in trainer.state.log_history if "vaccine/grad_norm" in e)

    assert norm(scaled) == pytest.approx(norm(plain), rel=1e-5)
    assert relative_error(scaled_update, plain_update) < 1e-5


def always_reentrant(function, *args, **kwargs):
    """Unsloth's and Axolotl's offloading checkpoints: reentrant whatever `use_reentrant` the settings give."""
    return torch.utils.checkpoint.checkpoint(function, *args, **{**kwargs, "use_reentrant": True})


@pytest.mark.parametrize("layer_sampling", [False, True], ids=["vaccine", "t-vaccine"])
def test_a_checkpoint_function_that_is_reentrant_against_its_settings_gives_the_same_update(
        tmp_path, monkeypatch, layer_sampling):
    """The model's settings say non-reentrant, the function it calls runs reentrant: pass 1 finds out at the first
    micro-batch and redoes it by the reentrant path (a full backward with tensor hooks); no step is lost."""
    import transformers.modeling_utils


    rows = token_rows(8)
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    sampling = ({"vaccine_layer_sampling": True, "vaccine_sampled_layers": 2, "vaccine_sampling_interval": 1,
                 "vaccine_probe_interval": 2, "vaccine_probe_batch_size": len(PROBE)} if layer_sampling else {})

    def update(model, folder, **overrides):
        args = VaccineTrainingArguments(**training_args(tmp_path / folder, **common, **overrides), **sampling)
        trainer = VaccineTrainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                                 probe_dataset=PROBE if layer_sampling else None)
        before = trainable_state(model)
        trainer.train()
        after = trainable_state(model)
        return torch.cat([(after[n] - before[n]).flatten() for n in after]), trainer

    plain, _ = update(tiny_lora_model(), "plain")
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", always_reentrant)
    swapped, trainer = update(tiny_lora_model(), "swapped", activation_checkpointing=True,
                              activation_checkpointing_kwargs={"use_reentrant": False})
    assert relative_error(swapped, plain) < 1e-4
    assert trainer._vaccine_reentrant_found  # it did take the recovery path
    assert trainer.vaccine_skipped_steps == 0


def test_keyword_rho_is_validated_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="rho must be"):
        VaccineTrainer(model=tiny_lora_model(), args=VaccineTrainingArguments(**training_args(tmp_path)),
                       train_dataset=token_rows(4), rho=float("nan"))
    trainer = VaccineTrainer(model=tiny_lora_model(), args=VaccineTrainingArguments(**training_args(tmp_path)),
                             train_dataset=token_rows(4), rho=0.7)
    assert trainer.args.rho == 0.7


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train_dataset is empty"):
        make_trainer(tmp_path, rows=[])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0])
def test_non_finite_or_zero_pass_one_gradient_skips_the_perturbation(tmp_path, value, caplog):
    caplog.set_level("WARNING", logger="vaccine_trainer")
    model = tiny_lora_model()
    fault = PassOneGradientFault(model, value)
    trainer = make_trainer(tmp_path, model=model, max_steps=2, vaccine_target="layer", vaccine_layers="0")
    trainer.train()
    fault.handle.remove()
    assert all(torch.isfinite(p).all() for p in trainable_state(model).values())
    assert trainer.vaccine_skipped_steps == 2
    assert [e["vaccine/skipped_steps"] for e in trainer.state.log_history if "loss" in e] == [1, 2]
    reason = "zero hidden-state gradient" if value == 0.0 else "non-finite hidden-state gradient"
    assert caplog.text.count(f"Vaccine: {reason} in pass 1") == 2 and "2 skipped so far" in caplog.text
    # the skipped step is exactly a plain step
    plain_model = tiny_lora_model()
    before = trainable_state(plain_model)
    make_trainer(tmp_path / "plain", model=plain_model, max_steps=2, rho=0.0).train()
    assert all(torch.equal(a, b) for a, b in zip(trainable_state(plain_model).values(),
                                                  trainable_state(model).values()))
    assert not all(torch.equal(a, b) for a, b in zip(before.values(), trainable_state(model).values()))


def test_failure_in_pass_two_backward_leaves_no_partial_gradients(tmp_path):
    model = tiny_lora_model()
    trainer = make_trainer(tmp_path, model=model)
    batch = default_data_collator(token_rows(2))
    tokens = torch.tensor(2 * 11)  # as the Trainer's loop passes it: labels that count, over the window
    trainer.training_step(model, batch, tokens)  # first micro-batch of an accumulation window
    assert any(p.grad is not None for p in model.parameters())

    forwards = {"n": 0}

    def explode_in_backward(module, args, output):
        forwards["n"] += 1
        if forwards["n"] == 2:  # pass 2's forward: the fault fires during its backward
            output.register_hook(lambda grad: (_ for _ in ()).throw(RuntimeError("backward fault")))

    handle = model.get_base_model().model.layers[1].register_forward_hook(explode_in_backward)
    with pytest.raises(RuntimeError, match="backward fault"):
        trainer.training_step(model, batch, tokens)
    handle.remove()
    assert all(p.grad is None for p in model.parameters())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert torch.isfinite(trainer.training_step(model, batch, tokens))  # training goes on
