"""`vaccine_state`: what a run keeps in its checkpoints and beside its adapter, so that resuming loses nothing and the
saved run can be reproduced."""

from __future__ import annotations

import json

import pytest
import torch
from testing_utils import (
    PassOneGradientFault, make_trainer, relative_error, tiny_lora_model, token_rows, trainable_state,
)
from transformers.data.data_collator import default_data_collator



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
