"""T-Vaccine inside the Trainer: the probe, the draw and the freezing at each optimizer step's start.

A mixin of `VaccineMixin` (which provides the hooks, pass 1's model and context, and the state callback);
the arithmetic of probabilities, draws and freezing is in `layer_sampling`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from .config import parse_layer_spec
from .layer_sampling import LayerFreezer, LayerSamplingState, draw_layers, layer_probabilities, probe_rows
from .layers import find_decoder_layers

logger = logging.get_logger(__name__)


class TargetedLayersMixin:
    """T-Vaccine's layer sampling for `VaccineMixin`; active when `vaccine_layer_sampling` is set."""

    def _set_up_layer_sampling(self, probe_dataset) -> None:
        """Candidate layers, their trainable parameters and the harmful probe data, checked at start-up."""
        settings = self.vaccine_args
        decoder_layers = find_decoder_layers(self.model)
        indices = (list(range(len(decoder_layers))) if settings.vaccine_layers is None
                   else parse_layer_spec(settings.vaccine_layers, len(decoder_layers)))
        if settings.vaccine_sampled_layers > len(indices):
            raise ValueError(
                f"vaccine_sampled_layers={settings.vaccine_sampled_layers} but only {len(indices)} layers can be "
                f"sampled ({'vaccine_layers=' + repr(settings.vaccine_layers) if settings.vaccine_layers else 'all'}"
                f"): choose at most {len(indices)}.")
        if settings.vaccine_layer_probabilities == "harmful_gradient":
            if probe_dataset is None or len(probe_dataset) == 0:
                raise ValueError(
                    "T-Vaccine weighs layers by their gradient on harmful data: pass probe_dataset= (harmful "
                    "prompt -> harmful answer rows, in the training data's format; `--probe_dataset` in "
                    "`vaccine-trainer align`), or set vaccine_layer_probabilities='uniform'.")
            self._vaccine_probe_dataset = self._prepare_probe_dataset(probe_dataset)
        self._vaccine_freezer = LayerFreezer([decoder_layers[i] for i in indices],
                                             checkpoint_frozen=settings.vaccine_checkpoint_frozen_layers)
        self._vaccine_state.layer_sampling = LayerSamplingState(layer_indices=indices).to_dict()
        logger.info(
            f"T-Vaccine: {settings.vaccine_sampled_layers} of {len(indices)} layers active at a time, drawn every "
            f"{settings.vaccine_sampling_interval} steps ({settings.vaccine_layer_probabilities} probabilities"
            + (f", probed every {settings.vaccine_probe_interval} steps)." if self._vaccine_probe_dataset
               is not None else ")."))

    def _prepare_probe_dataset(self, dataset):
        """The probe rows as the collator expects them; trainers that tokenize (TRL) override this."""
        if hasattr(dataset, "column_names") and self.args.remove_unused_columns:
            return self._remove_unused_columns(dataset, description="probe")
        return dataset

    @property
    def vaccine_layer_sampling_state(self) -> LayerSamplingState | None:
        """T-Vaccine's probabilities and active layers (decoder-layer indices via `active_layers()`)."""
        saved = self._vaccine_state.layer_sampling
        return LayerSamplingState.from_dict(saved) if saved is not None else None

    def _vaccine_layer_sampling_step(self, model: nn.Module) -> None:
        """At the first micro-batch of an optimizer step: probe and draw when due, then freeze the rest."""
        step = self.state.global_step
        if step == self._vaccine_seen_step:
            return
        self._vaccine_seen_step = step
        settings, state = self.vaccine_args, self.vaccine_layer_sampling_state
        count = len(state.layer_indices)
        if settings.vaccine_layer_probabilities == "uniform":
            state.probabilities = [1.0 / count] * count
        elif state.probabilities is None or (step % settings.vaccine_probe_interval == 0 and state.probe_step != step):
            self._vaccine_freezer.release()  # the probe sees the whole model, as plain Vaccine's pass 1 does
            norms = self._vaccine_probe_norms(model, step)
            try:
                state.probabilities, state.probe_step = layer_probabilities(norms), step
            except ValueError as error:
                if state.probabilities is None:
                    state.probabilities = [1.0 / count] * count
                logger.warning(f"T-Vaccine: probe at step {step} skipped ({error}); keeping the previous "
                               "probabilities (uniform if none).")
            self._vaccine_sampling_logs.update(
                {f"vaccine/layer_probability/{layer}": p for layer, p in zip(state.layer_indices, state.probabilities)})
        if state.active is None or (step % settings.vaccine_sampling_interval == 0 and state.draw_step != step):
            state.active = draw_layers(state.probabilities, settings.vaccine_sampled_layers, self.args.seed, step)
            state.draw_step = step
            active_layers = state.active_layers()
            logger.info(f"T-Vaccine: step {step}, active layers {active_layers}.")
            self._vaccine_sampling_logs.update({"vaccine/lowest_active_layer": min(active_layers),
                                                "vaccine/active_layers": len(active_layers)})
            self._vaccine_sampling_logs.update(
                {f"vaccine/layer_active/{layer}": float(layer in active_layers) for layer in state.layer_indices})
        self._vaccine_state.layer_sampling = state.to_dict()
        self._vaccine_freezer.activate(state.active)
        self._vaccine_hooks.active = [i in state.active for i in range(count)]

    def _vaccine_probe_norms(self, model: nn.Module, step: int) -> list[float]:
        """Hidden-state gradient norm of every candidate layer on a harmful batch; no parameter `.grad` is made.

        Averaged over processes, so every process draws from the same probabilities.
        """
        dataset = self._vaccine_probe_dataset
        rows = probe_rows(len(dataset), self.vaccine_args.vaccine_probe_batch_size, self.args.seed, step)
        self._vaccine_hooks.active = None  # every candidate layer, frozen or not
        # The AMP scale keeps fp16 gradients from underflowing; it cancels in the normalised probabilities.
        gradients, _ = self._vaccine_hidden_state_gradients(
            model, self.data_collator([dataset[i] for i in rows]), loss_scale=self._vaccine_loss_scale() or 1.0)
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) if g is not None
                             else torch.zeros((), device=self.args.device) for g in gradients]).to(self.args.device)
        if self.args.world_size > 1:
            norms = self.accelerator.reduce(norms, reduction="mean")
        return norms.tolist()

    def _check_resumed_layers(self, sampling: dict) -> None:
        expected = self.vaccine_layer_sampling_state.layer_indices
        if sampling.get("layer_indices") != expected:
            raise ValueError(f"The checkpoint sampled layers {sampling.get('layer_indices')}, this run samples "
                             f"{expected}: resume with the same vaccine_layers.")
