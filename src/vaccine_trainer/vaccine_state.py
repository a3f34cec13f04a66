"""What a Vaccine run keeps on disk besides the adapter: its settings and counters in every checkpoint's
`trainer_state.json`, and `vaccine_config.json` beside the saved model, so a run can be resumed and reproduced."""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .targeted import LayerSampler

VACCINE_CONFIG_NAME = "vaccine_config.json"


class VaccineStateCallback(TrainerCallback, ExportableState):
    """Keeps the Vaccine settings and counters in `trainer_state.json` of every checkpoint.

    On resume the trainer restores `skipped_steps`, so the logged counter carries on, and T-Vaccine's
    layer probabilities and active layers (`layer_sampling`, read from the sampler when saved), so the run
    draws what it would have drawn.
    """

    def __init__(self, settings: dict | None = None, modules: list[str] | None = None, skipped_steps: int = 0,
                 layer_sampling: dict | None = None):
        self.settings = dict(settings or {})
        self.modules = list(modules or [])
        self.skipped_steps = skipped_steps
        self.sampler: LayerSampler | None = None
        self._saved_sampling = layer_sampling  # what a checkpoint held, until a sampler takes it

    @property
    def layer_sampling(self) -> dict | None:
        return self.sampler.state.to_dict() if self.sampler is not None else self._saved_sampling

    @layer_sampling.setter
    def layer_sampling(self, saved: dict | None) -> None:  # the Trainer restores attributes by setting them
        self._saved_sampling = saved

    def state(self) -> dict:
        return {
            "args": {"settings": self.settings, "modules": self.modules},
            "attributes": {"skipped_steps": self.skipped_steps, "layer_sampling": self.layer_sampling},
        }

    def restore(self, stateful_callbacks: dict[str, Any] | None) -> None:
        """Take `skipped_steps` and T-Vaccine's layers from a checkpoint's `stateful_callbacks`, whatever
        `restore_callback_states_from_checkpoint` says: the counter is part of the run's record (logged, and
        written into the model card), not a setting the user may choose to reset."""
        saved = (stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) and saved else saved
        if not isinstance(saved, dict):
            return
        attributes = saved.get("attributes", {})
        self.skipped_steps = int(attributes.get("skipped_steps", 0))
        sampling = attributes.get("layer_sampling")
        if self.sampler is not None and sampling is not None:
            self.sampler.restore(sampling)


def write_vaccine_config(output_dir: str, settings: dict[str, Any], modules: list[str]) -> None:
    """`vaccine_config.json`: the settings and the perturbed modules of the saved run."""
    with open(os.path.join(output_dir, VACCINE_CONFIG_NAME), "w") as handle:
        json.dump({"settings": settings, "modules": modules}, handle, indent=2)


__all__ = ["VACCINE_CONFIG_NAME", "VaccineStateCallback", "write_vaccine_config"]
