"""Bad input, injected faults, resume and saved artefacts: nothing lost, nothing left behind."""

from __future__ import annotations

import json

import pytest
import torch
from testing_utils import relative_error, tiny_lora_model, token_rows, trainable_state, training_args
from torch import nn
from transformers.data.data_collator import default_data_collator

from vaccine_trainer import VaccineTrainer, VaccineTrainingArguments


def make_trainer(tmp_path, model=None, rows=None, **overrides):
    vaccine = {k: overrides.pop(k) for k in list(overrides) if k == "rho" or k.startswith("vaccine_")}
    args = VaccineTrainingArguments(**training_args(tmp_path, **overrides), **vaccine)
    return VaccineTrainer(model=model if model is not None else tiny_lora_model(), args=args,
                          train_dataset=token_rows(4) if rows is None else rows)


@pytest.mark.parametrize("settings, message", [
    ({"rho": -1.0}, "rho must be a finite number >= 0"),
    ({"rho": float("nan")}, "rho must be a finite number >= 0"),
    ({"rho": float("inf")}, "rho must be a finite number >= 0"),
    ({"vaccine_target": "mlp"}, "vaccine_target must be one of"),
    ({"vaccine_norm": "l1"}, "vaccine_norm must be one of"),
    ({"vaccine_norm": "relative"}, r"rho=2.0 would push it by 200%. Set rho to a small fraction"),  # the default rho
    ({"vaccine_perturbation": "uniform"}, "vaccine_perturbation must be one of"),
    ({"vaccine_layers": "1-x"}, "malformed"),
    ({"vaccine_layers": "3-1"}, "empty"),
    ({"vaccine_modules": "layers.(["}, "not a valid regular expression"),
])
def test_bad_settings_are_refused_when_the_arguments_are_built(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        VaccineTrainingArguments(output_dir=str(tmp_path), **settings)


@pytest.mark.parametrize("settings, message", [
    ({"vaccine_layers": "0-7"}, r"names layers \[3, 4, 5, 6, 7\] but the model has 3 layers"),
    ({"vaccine_modules": r".*\.mlp_attention"}, "matches no module"),
    ({"vaccine_modules": ["model.layers.0.nope"]}, "do not exist"),
])
def test_bad_settings_against_the_model_are_refused_at_construction(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, **settings)


def test_keyword_rho_is_validated_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="rho must be"):
        VaccineTrainer(model=tiny_lora_model(), args=VaccineTrainingArguments(**training_args(tmp_path)),
                       train_dataset=token_rows(4), rho=float("nan"))
    trainer = VaccineTrainer(model=tiny_lora_model(), args=VaccineTrainingArguments(**training_args(tmp_path)),
                             train_dataset=token_rows(4), rho=0.7)
    assert trainer.args.rho == 0.7


def test_model_without_layers_says_how_to_choose_modules(tmp_path):
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 8)
            self.head = nn.Linear(8, 64)

        def forward(self, input_ids, labels=None, **kwargs):
            logits = self.head(self.embed(input_ids))
            return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}

    with pytest.raises(ValueError, match="vaccine_modules") as error:
        make_trainer(tmp_path, model=NoLayers())
    assert "embed" in str(error.value)  # lists what the model has
    trainer = make_trainer(tmp_path, model=NoLayers(), vaccine_modules="embed")
    assert trainer.vaccine_modules == ["embed"]


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train_dataset is empty"):
        make_trainer(tmp_path, rows=[])


class PassOneGradientFault:
    """Replaces the hidden-state gradient at layer 1 by NaN/inf/0, in pass 1 only (odd forwards)."""

    def __init__(self, model, value: float):
        self.forwards = 0
        self.value = value
        layer = model.get_base_model().model.layers[1]
        self.handle = layer.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.forwards += 1
        if self.forwards % 2 == 1 and output.requires_grad:
            output.register_hook(lambda grad: torch.full_like(grad, self.value))


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


@pytest.mark.parametrize("perturbation", ["gradient", "gaussian"])
def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path, perturbation):
    rows = token_rows(8)
    settings = dict(max_steps=4, per_device_train_batch_size=2, optim="adamw_torch", learning_rate=1e-2,
                    lr_scheduler_type="linear", vaccine_perturbation=perturbation, rho=0.5 if perturbation ==
                    "gaussian" else 2.0, save_strategy="steps", save_steps=2)
    straight = tiny_lora_model()
    make_trainer(tmp_path / "straight", model=straight, rows=rows, **settings).train()

    interrupted = make_trainer(tmp_path / "resumed", model=tiny_lora_model(), rows=rows,
                               **{**settings, "max_steps": 4})
    interrupted.args.max_steps = 4
    interrupted.control.should_training_stop = False

    class StopAfterTwo(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    interrupted.add_callback(StopAfterTwo())
    interrupted.train()
    resumed_model = tiny_lora_model()
    with torch.no_grad():  # scrambled adapters: everything trained must come from the checkpoint
        for param in resumed_model.parameters():
            if param.requires_grad:
                param.normal_()
    resumed = make_trainer(tmp_path / "resumed", model=resumed_model, rows=rows, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    want, got = trainable_state(straight), trainable_state(resumed_model)
    for name in want:
        assert relative_error(got[name], want[name]) < 1e-6, name


def test_saved_adapter_loads_with_plain_peft_and_records_the_settings(tmp_path):
    import peft
    from testing_utils import tiny_model

    model = tiny_lora_model()
    trainer = make_trainer(tmp_path, model=model, max_steps=2, rho=1.5, vaccine_target="layer",
                           save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    loaded = peft.PeftModel.from_pretrained(tiny_model(), str(tmp_path))
    batch = default_data_collator(token_rows(2))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-6)
    saved = json.loads((tmp_path / "vaccine_config.json").read_text())
    assert saved["settings"]["rho"] == 1.5 and saved["settings"]["vaccine_target"] == "layer"
    assert saved["modules"][0] == "base_model.model.model.layers.0"
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["VaccineStateCallback"]["args"]["settings"]["rho"] == 1.5
    card = (tmp_path / "README.md").read_text()
    assert "## Vaccine alignment" in card and "| `rho` | `1.5` |" in card and "vaccine" in card.split("---")[1]


@pytest.mark.parametrize("restore_flag", [False, True])
def test_resume_restores_skipped_steps_whatever_the_callback_flag(tmp_path, restore_flag):
    """The skip counter carries on across a resume (the Trainer restores callbacks only when asked)."""
    model = tiny_lora_model()
    fault = PassOneGradientFault(model, float("nan"))
    first = make_trainer(tmp_path, model=model, max_steps=2, vaccine_target="layer", vaccine_layers="0",
                         save_strategy="steps", save_steps=2)
    first.train()
    fault.handle.remove()
    assert first.vaccine_skipped_steps == 2
    resumed = make_trainer(tmp_path, model=tiny_lora_model(), max_steps=3, vaccine_target="layer",
                           vaccine_layers="0", restore_callback_states_from_checkpoint=restore_flag)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.vaccine_skipped_steps == 2  # restored, and no new skip in step 3
    assert [e["vaccine/skipped_steps"] for e in resumed.state.log_history if "loss" in e][-1] == 2
    assert resumed._vaccine_state in resumed.callback_handler.callbacks
