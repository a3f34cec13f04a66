"""`layers`: which modules Vaccine hooks, and what a model without the expected layers is told."""

from __future__ import annotations

import pytest
from testing_utils import make_trainer
from torch import nn


@pytest.mark.parametrize("settings, message", [
    ({"vaccine_layers": "0-7"}, r"names layers \[3, 4, 5, 6, 7\] but the model has 3 layers"),
    ({"vaccine_modules": r".*\.mlp_attention"}, "matches no module"),
    ({"vaccine_modules": ["model.layers.0.nope"]}, "do not exist"),
])
def test_bad_settings_against_the_model_are_refused_at_construction(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, **settings)


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
