"""Vaccine's settings as one dataclass, mixed into the Trainer's argument classes.

Keeping every method setting in :class:`VaccineArguments` means ``HfArgumentParser`` and
``TrlParser`` expose the same ``--rho``/``--vaccine_*`` flags (command line, JSON and YAML)
for every trainer of the package, and the values are saved with the training arguments.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

VACCINE_TARGETS = ("attention", "layer")
VACCINE_NORMS = ("global", "layer", "relative")
VACCINE_PERTURBATIONS = ("gradient", "gaussian")
LAYER_PROBABILITIES = ("harmful_gradient", "uniform")


@dataclass
class VaccineArguments:
    """Settings of Vaccine's perturbation-aware alignment.

    Parameters:
        rho (`float`, defaults to `2.0`):
            Perturbation intensity. For `"gradient"` it is the norm of the perturbation; for
            `"gaussian"` the variance of the noise. `0` is plain training (one pass per step).
        vaccine_target (`str`, defaults to `"attention"`):
            Which hidden states are perturbed: `"attention"` (output of each decoder layer's
            self-attention block, before the residual add, as in the paper's code) or `"layer"`
            (output of each decoder layer).
        vaccine_norm (`str`, defaults to `"global"`):
            `"global"`: eps_l = rho * g_l / ||g|| with the norm over all perturbed layers together
            (the paper): rho is the norm of eps over the whole micro-batch and every layer, so the push each
            sample gets changes with batch size, sequence length and depth, and most of it lands where the
            hidden-state gradient is largest (in SmolLM2, layer 0). `"layer"`: every layer is normalised on its
            own, ||eps_l|| = rho. `"relative"`: every token of every layer is pushed, in the direction of its
            gradient, by the fraction rho of its own hidden state, ||eps_{l,t}|| = rho * ||h_{l,t}||
            (rho 0.05 = 5%): the same relative push whatever the batch size, length, depth or scale of the
            layer.
        vaccine_layers (`str` or `list[int]`, *optional*):
            Subset of decoder-layer indices to perturb, e.g. `"16-29"`, `"0,2,4"`, `"-4--1"` or a
            list of ints. Negative indices count from the last layer. Defaults to all layers.
        vaccine_perturbation (`str`, defaults to `"gradient"`):
            `"gradient"` (Vaccine) or `"gaussian"` (the paper's random-perturbation ablation:
            Gaussian noise of variance rho, one pass per step).
        vaccine_modules (`str` or `list[str]`, *optional*):
            Modules to perturb, overriding automatic discovery: a list of exact module names, or
            a regular expression that must match a full module name (as printed by
            `model.named_modules()`). `vaccine_layers` and `vaccine_target` are then ignored.
        vaccine_layer_sampling (`bool`, defaults to `False`):
            T-Vaccine (Liu et al., 2024): perturb and train only `vaccine_sampled_layers` decoder layers at a
            time, drawn every `vaccine_sampling_interval` optimizer steps with probabilities proportional to
            each layer's hidden-state gradient norm on a batch of harmful data (`probe_dataset`), measured
            every `vaccine_probe_interval` steps. The other layers' adapters are frozen until the next draw.
        vaccine_sampled_layers (`int`, defaults to `8`): layers active at a time (the authors' S).
        vaccine_sampling_interval (`int`, defaults to `20`): optimizer steps between draws (J).
        vaccine_probe_interval (`int`, defaults to `200`): optimizer steps between probes (K).
        vaccine_probe_batch_size (`int`, defaults to `1`): harmful rows per probe (the authors use 1).
        vaccine_layer_probabilities (`str`, defaults to `"harmful_gradient"`): `"harmful_gradient"` (T-Vaccine)
            or `"uniform"` (the ablation: every layer equally likely, no probe).
        vaccine_checkpoint_frozen_layers (`bool`, defaults to `True`): run the frozen layers under activation
            checkpointing, as the authors' code does: they keep no activations (the memory saving) and are
            recomputed in backward (a time cost); the update is the same either way.
    """

    rho: float = field(
        default=2.0,
        metadata={"help": "Size of the perturbation (>= 0; 0: plain training, one pass per step). With "
                          "--vaccine_norm global (the paper; paper: 2) the L2 norm of eps over the micro-batch's "
                          "hidden states across all layers, so each sample's push changes with batch size, length "
                          "and depth; with relative, the fraction of each token's own hidden-state norm (e.g. 0.01)."},
    )
    vaccine_target: str = field(
        default="attention",
        metadata={"help": "Hidden states to perturb.", "choices": list(VACCINE_TARGETS)},
    )
    vaccine_norm: str = field(
        default="global",
        metadata={"help": "'global' (the paper): rho is the L2 norm of eps over the micro-batch and all layers; "
                          "'layer': rho per layer; 'relative': every token pushed by the fraction rho of its own "
                          "hidden state (rho 0.05 = 5%%), whatever the batch, length and depth.",
                  "choices": list(VACCINE_NORMS)},
    )
    vaccine_layers: str | None = field(
        default=None,
        metadata={"help": "Decoder layers to perturb, e.g. '16-29' or '0,2,4'. Default: all layers."},
    )
    vaccine_perturbation: str = field(
        default="gradient",
        metadata={"help": "'gradient' (Vaccine) or 'gaussian' (random-perturbation ablation).",
                  "choices": list(VACCINE_PERTURBATIONS)},
    )
    vaccine_modules: str | None = field(
        default=None,
        metadata={"help": "Regex (full match) or list of module names to perturb, overriding discovery."},
    )
    vaccine_layer_sampling: bool = field(
        default=False,
        metadata={"help": "T-Vaccine: perturb and train only a few sampled decoder layers at a time."},
    )
    vaccine_sampled_layers: int = field(default=8, metadata={"help": "T-Vaccine: layers active at a time (S)."})
    vaccine_sampling_interval: int = field(
        default=20, metadata={"help": "T-Vaccine: optimizer steps between layer draws (J)."})
    vaccine_probe_interval: int = field(
        default=200, metadata={"help": "T-Vaccine: optimizer steps between harmful-gradient probes (K)."})
    vaccine_probe_batch_size: int = field(default=1, metadata={"help": "T-Vaccine: harmful rows per probe."})
    vaccine_layer_probabilities: str = field(
        default="harmful_gradient",
        metadata={"help": "T-Vaccine: how layers are weighted in the draw.", "choices": list(LAYER_PROBABILITIES)},
    )
    vaccine_checkpoint_frozen_layers: bool = field(
        default=True,
        metadata={"help": "T-Vaccine: recompute the frozen layers in backward instead of keeping their activations."},
    )

    def __post_init__(self) -> None:
        self.validate_vaccine_arguments()
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:
            parent_post_init()

    def validate_vaccine_arguments(self) -> None:
        """Reject bad settings at construction time, with what to do instead."""
        try:
            self.rho = float(self.rho)
        except (TypeError, ValueError):
            raise ValueError(f"rho must be a number >= 0, got {self.rho!r}.") from None
        if not math.isfinite(self.rho) or self.rho < 0:
            raise ValueError(
                f"rho must be a finite number >= 0, got {self.rho}. The paper uses rho=2; "
                "rho=0 trains without perturbation."
            )
        if self.vaccine_norm == "relative" and self.rho > 1:
            raise ValueError(
                f"With vaccine_norm='relative', rho is the fraction of each hidden state's own size that it is pushed "
                f"by; rho={self.rho} would push it by {self.rho:.0%}. Set rho to a small fraction, e.g. --rho 0.05."
            )
        for name, allowed in (
            ("vaccine_target", VACCINE_TARGETS),
            ("vaccine_norm", VACCINE_NORMS),
            ("vaccine_perturbation", VACCINE_PERTURBATIONS),
            ("vaccine_layer_probabilities", LAYER_PROBABILITIES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")
        if self.vaccine_layers is not None:
            parse_layer_spec(self.vaccine_layers)  # syntax only; the range is checked against the model
        if isinstance(self.vaccine_modules, str):
            try:
                re.compile(self.vaccine_modules)
            except re.error as error:
                raise ValueError(
                    f"vaccine_modules {self.vaccine_modules!r} is not a valid regular expression: {error}. "
                    "Pass a regex that fully matches module names, or a list of exact names."
                ) from None
        elif self.vaccine_modules is not None and not (
            isinstance(self.vaccine_modules, (list, tuple)) and self.vaccine_modules
        ):
            raise ValueError("vaccine_modules must be a regex string or a non-empty list of module names.")

        self._validate_layer_sampling()

    def _validate_layer_sampling(self) -> None:
        for name in ("vaccine_sampled_layers", "vaccine_sampling_interval", "vaccine_probe_interval",
                     "vaccine_probe_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
        if not self.vaccine_layer_sampling:
            return
        if self.rho == 0 or self.vaccine_perturbation != "gradient":
            raise ValueError(
                "vaccine_layer_sampling (T-Vaccine) perturbs the sampled layers with Vaccine's gradient "
                f"perturbation: it needs rho > 0 and vaccine_perturbation='gradient' (got rho={self.rho}, "
                f"vaccine_perturbation={self.vaccine_perturbation!r}).")
        if self.vaccine_modules is not None:
            raise ValueError(
                "vaccine_layer_sampling samples decoder layers, so it cannot use vaccine_modules (modules by "
                "name have no layer index): choose the candidate layers with vaccine_layers and the module "
                "of each with vaccine_target instead.")

    def vaccine_kwargs(self) -> dict[str, Any]:
        """The Vaccine settings alone, e.g. to copy them onto another argument class."""
        return {f.name: getattr(self, f.name) for f in fields(VaccineArguments)}


def parse_layer_spec(spec: str | int | list[int] | tuple[int, ...], num_layers: int | None = None) -> list[int]:
    """Turn '16-29', '0,2,4', '-4--1' or a list of ints into sorted layer indices.

    With `num_layers`, negative indices are resolved and every index is checked to exist.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        items: list[int] = [spec]
    elif isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
            raise ValueError(f"vaccine_layers must be a non-empty list of ints, got {spec!r}.")
        items = list(spec)
    elif isinstance(spec, str):
        items = []
        for part in spec.replace(" ", "").split(","):
            match = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
            if match is None:
                raise ValueError(
                    f"vaccine_layers {spec!r} is malformed at {part!r}: use indices and ranges such as "
                    "'16-29', '0,2,4' or '-4--1' (negative counts from the last layer)."
                )
            start = int(match.group(1))
            stop = int(match.group(2)) if match.group(2) is not None else start
            if num_layers is not None:
                start, stop = (i + num_layers if i < 0 else i for i in (start, stop))
            if stop < start:
                raise ValueError(f"vaccine_layers range {part!r} is empty (end before start).")
            items.extend(range(start, stop + 1))
    else:
        raise ValueError(f"vaccine_layers must be a string like '16-29' or a list of ints, got {spec!r}.")
    if num_layers is None:
        return sorted(set(items))
    resolved = sorted({i + num_layers if i < 0 else i for i in items})
    bad = [i for i in resolved if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"vaccine_layers {spec!r} names layers {bad} but the model has {num_layers} layers "
            f"(valid indices 0..{num_layers - 1}, or negative from the end)."
        )
    return resolved


@dataclass
class VaccineTrainingArguments(VaccineArguments, TrainingArguments):
    """`TrainingArguments` plus Vaccine's settings (see [`VaccineArguments`])."""
