"""T-Vaccine's targeted layers (Liu et al., 2024): which decoder layers are perturbed and trained, and when.

Every `vaccine_probe_interval` optimizer steps a batch of harmful data goes forward and backward; the L2
norm of each layer's hidden-state gradient gives that layer's probability, p_l = norm_l / sum of norms.
Every `vaccine_sampling_interval` steps `vaccine_sampled_layers` layers are drawn without replacement with
those probabilities; until the next draw only they are perturbed and only their adapters train. Frozen
layers get no gradient at all (`requires_grad=False`), so the optimizer skips them (AdamW leaves a
parameter whose `.grad` is None alone: no moment update, no weight decay) and autograd builds no graph
below the lowest active layer. As in the authors' code, frozen layers also run under (non-reentrant)
activation checkpointing: they keep no activations for backward and recompute them instead, which is
where most of the memory goes; gradients are unchanged.

Draws and probe batches depend on (seed, step) only, so every process draws the same layers and a resumed
run draws what the uninterrupted run drew; the probabilities are kept in the checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from .checkpointing import FLAGS as CHECKPOINT_FLAGS
from .checkpointing import FUNCTIONS as CHECKPOINT_FUNCTIONS


def step_seed(seed: int, step: int, stream: int) -> int:
    """A generator seed for (run seed, optimizer step, what it is for): independent of process and resume."""
    return (seed * 1_000_003 + step * 7_919 + stream) % (2**63 - 1)


def layer_probabilities(norms: Sequence[float]) -> list[float]:
    """p_l = norm_l / sum of norms; raises when no layer has a finite, positive norm."""
    values = [float(n) for n in norms]
    total = sum(values)
    if not values or any(v < 0 or v != v or v == float("inf") for v in values) or not total > 0:
        raise ValueError(f"The probe's hidden-state gradient norms cannot be normalised: {values}.")
    return [v / total for v in values]


def draw_layers(probabilities: Sequence[float], count: int, seed: int, step: int) -> list[int]:
    """`count` positions drawn without replacement with `probabilities`, sorted.

    Layers with probability 0 are drawn only when fewer than `count` layers have a positive one
    (then uniformly among them), so the draw always returns `count` layers.
    """
    if not 1 <= count <= len(probabilities):
        raise ValueError(f"Cannot draw {count} of {len(probabilities)} layers.")
    generator = torch.Generator().manual_seed(step_seed(seed, step, stream=0))
    weights = torch.tensor(probabilities, dtype=torch.float64)
    positive = int((weights > 0).sum())
    chosen = torch.multinomial(weights, min(count, positive), replacement=False, generator=generator).tolist()
    if len(chosen) < count:
        rest = [i for i in range(len(probabilities)) if i not in chosen]
        order = torch.randperm(len(rest), generator=generator).tolist()
        chosen += [rest[i] for i in order[: count - len(chosen)]]
    return sorted(chosen)


def probe_rows(dataset_size: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Which rows of the harmful data the probe at `step` reads."""
    generator = torch.Generator().manual_seed(step_seed(seed, step, stream=1))
    return torch.randperm(dataset_size, generator=generator)[: min(batch_size, dataset_size)].tolist()


class LayerFreezer:
    """Switches each layer between trained and frozen.

    Trained: its parameters that were trainable when the freezer was built get `requires_grad=True`.
    Frozen: `requires_grad=False`, and with `checkpoint_frozen` the layer runs under transformers' own
    per-layer activation checkpointing (non-reentrant), unless the user already checkpoints every layer.
    """

    def __init__(self, layers: Sequence[nn.Module], checkpoint_frozen: bool = True):
        self.layers = list(layers)
        self.parameters = [[p for p in layer.parameters() if p.requires_grad] for layer in self.layers]
        if not any(self.parameters):
            raise ValueError("T-Vaccine trains the adapters of the sampled layers, but no decoder layer has a "
                             "trainable parameter: add LoRA adapters (or train the layers) first.")
        self._wants_checkpoint_frozen = checkpoint_frozen
        self._saved: list[dict] | None = None  # taken at the first draw: the Trainer enables checkpointing in train()
        self.checkpoint_frozen = False

    def _snapshot(self) -> None:
        """Each layer's checkpointing as the run set it up, restored on release; taken once, at the first draw."""
        if self._saved is not None:
            return
        self._saved = [self._checkpoint_state(layer) for layer in self.layers]
        checkpointable = all(any(hasattr(layer, flag) for flag in CHECKPOINT_FLAGS) for layer in self.layers)
        already = any(flags.get(flag) is True for flags in self._saved for flag in CHECKPOINT_FLAGS)
        self.checkpoint_frozen = self._wants_checkpoint_frozen and checkpointable and not already

    @staticmethod
    def _checkpoint_state(layer: nn.Module) -> dict:
        names = (*CHECKPOINT_FLAGS, *CHECKPOINT_FUNCTIONS)
        return {name: getattr(layer, name) for name in names if hasattr(layer, name)}

    def _set_checkpointing(self, position: int, on: bool) -> None:
        layer, saved = self.layers[position], self._saved[position]
        if not on:
            for name, value in saved.items():
                setattr(layer, name, value)
            return
        recompute = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for name in CHECKPOINT_FLAGS:
            if hasattr(layer, name):
                setattr(layer, name, True)
        for name in CHECKPOINT_FUNCTIONS:
            setattr(layer, name, recompute)

    def activate(self, active: Sequence[int]) -> None:
        self._snapshot()
        wanted = set(active)
        for position, params in enumerate(self.parameters):
            for param in params:
                param.requires_grad_(position in wanted)
            if self.checkpoint_frozen:
                self._set_checkpointing(position, position not in wanted)

    def release(self) -> None:
        """Every layer as before T-Vaccine took over: trainable, and checkpointed as it was."""
        for position, params in enumerate(self.parameters):
            for param in params:
                param.requires_grad_(True)
            if self._saved is not None:
                self._set_checkpointing(position, False)


@dataclass
class LayerSamplingState:
    """What a checkpoint keeps: the probabilities, the active layers and the steps they come from.

    Positions index the candidate layers (`layer_indices`), which are decoder-layer indices.
    """

    layer_indices: list[int]
    probabilities: list[float] | None = None
    active: list[int] | None = None
    probe_step: int | None = None
    draw_step: int | None = None

    def active_layers(self) -> list[int]:
        """The decoder-layer indices of the active positions."""
        return [self.layer_indices[i] for i in self.active or []]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LayerSamplingState:
        return cls(**{key: values.get(key) for key in ("layer_indices", "probabilities", "active", "probe_step",
                                                        "draw_step")})


__all__ = ["LayerFreezer", "LayerSamplingState", "draw_layers", "layer_probabilities", "probe_rows", "step_seed"]
