"""T-Vaccine's layer sampler: a part the trainer holds, not a parent class.

The sampler owns what T-Vaccine adds to Vaccine: the candidate layers and their freezer, the harmful probe
data, the probabilities and active layers (`LayerSamplingState`, saved in every checkpoint by the trainer's
state callback) and the values to log. The trainer asks it, at each micro-batch, which hooked layers are
active, handing it a function that measures hidden-state gradient norms on a batch of probe rows; the
arithmetic of probabilities, draws and freezing is in `layer_sampling`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn
from transformers.utils import logging

from .config import VaccineArguments, parse_layer_spec
from .layer_sampling import LayerFreezer, LayerSamplingState, draw_layers, layer_probabilities, probe_rows
from .layers import find_decoder_layers

logger = logging.get_logger(__name__)

ProbeNorms = Callable[[Sequence[int]], list[float]]
"""Hidden-state gradient norm of every candidate layer on the probe rows given (indices into the probe data)."""


class LayerSampler:
    """Which decoder layers are perturbed and trained, re-drawn every `vaccine_sampling_interval` steps."""

    def __init__(self, model: nn.Module, settings: VaccineArguments, seed: int, probe_dataset=None,
                 prepare_probe: Callable = lambda dataset: dataset):
        """Candidate layers, their trainable parameters and the harmful probe data (as `prepare_probe` makes it
        ready for the collator), checked at start-up."""
        decoder_layers = find_decoder_layers(model)
        indices = (list(range(len(decoder_layers))) if settings.vaccine_layers is None
                   else parse_layer_spec(settings.vaccine_layers, len(decoder_layers)))
        if settings.vaccine_sampled_layers > len(indices):
            raise ValueError(
                f"vaccine_sampled_layers={settings.vaccine_sampled_layers} but only {len(indices)} layers can be "
                f"sampled ({'vaccine_layers=' + repr(settings.vaccine_layers) if settings.vaccine_layers else 'all'}"
                f"): choose at most {len(indices)}.")
        self.probe_dataset = None
        if settings.vaccine_layer_probabilities == "harmful_gradient":
            if probe_dataset is None or len(probe_dataset) == 0:
                raise ValueError(
                    "T-Vaccine weighs layers by their gradient on harmful data: pass probe_dataset= (harmful "
                    "prompt -> harmful answer rows, in the training data's format; `--probe_dataset` in "
                    "`vaccine-trainer align`), or set vaccine_layer_probabilities='uniform'.")
            self.probe_dataset = prepare_probe(probe_dataset)
        self.settings, self.seed = settings, seed
        self.freezer = LayerFreezer([decoder_layers[i] for i in indices],
                                    checkpoint_frozen=settings.vaccine_checkpoint_frozen_layers)
        self.state = LayerSamplingState(layer_indices=indices)
        self.logs: dict[str, float] = {}  # probabilities and active layers since the last log
        self._seen_step: int | None = None
        logger.info(
            f"T-Vaccine: {settings.vaccine_sampled_layers} of {len(indices)} layers active at a time, drawn every "
            f"{settings.vaccine_sampling_interval} steps ({settings.vaccine_layer_probabilities} probabilities"
            + (f", probed every {settings.vaccine_probe_interval} steps)." if self.probe_dataset is not None
               else ")."))

    def active_at(self, step: int, probe_norms: ProbeNorms) -> list[bool]:
        """The active mask over the candidate layers for a micro-batch of optimizer step `step`.

        At the step's first micro-batch: probe and draw when due, then freeze the layers not drawn.
        """
        if step != self._seen_step:
            self._seen_step = step
            self._update_probabilities(step, probe_norms)
            self._draw(step)
            self.freezer.activate(self.state.active)
        return [i in self.state.active for i in range(len(self.state.layer_indices))]

    def _update_probabilities(self, step: int, probe_norms: ProbeNorms) -> None:
        settings, state = self.settings, self.state
        count = len(state.layer_indices)
        if settings.vaccine_layer_probabilities == "uniform":
            state.probabilities = [1.0 / count] * count
            return
        if state.probabilities is not None and (step % settings.vaccine_probe_interval or state.probe_step == step):
            return
        self.freezer.release()  # the probe sees the whole model, as plain Vaccine's pass 1 does
        rows = probe_rows(len(self.probe_dataset), settings.vaccine_probe_batch_size, self.seed, step)
        try:
            state.probabilities, state.probe_step = layer_probabilities(probe_norms(rows)), step
        except ValueError as error:
            if state.probabilities is None:
                state.probabilities = [1.0 / count] * count
            logger.warning(f"T-Vaccine: probe at step {step} skipped ({error}); keeping the previous "
                           "probabilities (uniform if none).")
        self.logs.update({f"vaccine/layer_probability/{layer}": p
                          for layer, p in zip(state.layer_indices, state.probabilities)})

    def _draw(self, step: int) -> None:
        state = self.state
        if state.active is not None and (step % self.settings.vaccine_sampling_interval or state.draw_step == step):
            return
        state.active = draw_layers(state.probabilities, self.settings.vaccine_sampled_layers, self.seed, step)
        state.draw_step = step
        active_layers = state.active_layers()
        logger.info(f"T-Vaccine: step {step}, active layers {active_layers}.")
        self.logs.update({"vaccine/lowest_active_layer": min(active_layers),
                          "vaccine/active_layers": len(active_layers)})
        self.logs.update({f"vaccine/layer_active/{layer}": float(layer in active_layers)
                          for layer in state.layer_indices})

    def pop_logs(self) -> dict[str, float]:
        logs, self.logs = self.logs, {}
        return logs

    def release(self) -> None:
        """Every layer trainable again (when `train` returns or fails); the next step freezes anew."""
        self.freezer.release()
        self._seen_step = None

    def restore(self, saved: dict) -> None:
        """The probabilities and active layers of a checkpoint; its candidate layers must be this run's."""
        restored = LayerSamplingState.from_dict(saved)
        if restored.layer_indices != self.state.layer_indices:
            raise ValueError(f"The checkpoint sampled layers {restored.layer_indices}, this run samples "
                             f"{self.state.layer_indices}: resume with the same vaccine_layers.")
        self.state = restored
