"""Vaccine as an Axolotl plugin: a YAML with `rho:` aligns with Vaccine through Axolotl's own trainer builder.

    plugins:
      - vaccine_trainer.integrations.axolotl.VaccinePlugin   # Axolotl < 0.20; from 0.20 it loads by itself
    rho: 2

Axolotl loads installed plugins on every run (the `axolotl.plugins` entry point), so the plugin does nothing
unless the YAML sets `rho`. The keys are `VaccineArguments`' fields and are validated by it; the trainer is
`VaccineMixin` over `AxolotlTrainer`. Importing this module needs Axolotl (`pip install "vaccine-trainer[axolotl]"`).
"""

from __future__ import annotations

import contextlib
import functools
import typing
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field, create_model, model_validator

from ..config import VaccineArguments

VACCINE_KEYS = tuple(f.name for f in fields(VaccineArguments))
REFUSED_MODES = {
    "rl": "preference and RL training (rl: {value})",
    "reward_model": "reward-model training (reward_model: true)",
    "process_reward_model": "process-reward-model training (process_reward_model: true)",
}


def vaccine_enabled(cfg: typing.Mapping[str, Any]) -> bool:
    """Vaccine runs when the YAML sets `rho` (rho 0: one plain pass per step, with Vaccine's settings saved)."""
    return cfg.get("rho") is not None


def _refused_mode(cfg: typing.Mapping[str, Any]) -> str | None:
    for key, mode in REFUSED_MODES.items():
        value = cfg.get(key)
        if value:
            return mode.format(value=value)
    return None


class _VaccineKeysCheck(BaseModel):
    """Checks the Vaccine keys of an Axolotl YAML when Axolotl validates it, before anything is loaded."""

    @model_validator(mode="before")
    @classmethod
    def _check_vaccine_keys(cls, data: Any) -> Any:
        if not isinstance(data, typing.Mapping):
            return data
        given = {key: data[key] for key in VACCINE_KEYS if data.get(key) is not None}
        if not vaccine_enabled(data):
            if given:
                raise ValueError(f"{', '.join(sorted(given))} set without rho: Vaccine is off unless the YAML sets "
                                 "rho (the paper uses rho: 2).")
            return data
        mode = _refused_mode(data)
        if mode is not None:
            raise ValueError(f"Vaccine aligns with supervised fine-tuning; {mode} is not supported. Remove rho (and "
                             "the vaccine_* keys) from this YAML, or train with SFT.")
        VaccineArguments(**given)  # its own checks, with its messages
        return data


_HINTS = typing.get_type_hints(VaccineArguments)
VaccineAxolotlArgs = create_model(
    "VaccineAxolotlArgs",
    __base__=_VaccineKeysCheck,
    __module__=__name__,
    **{f.name: (_HINTS[f.name] | None, Field(default=None, description=f.metadata.get("help")))
       for f in fields(VaccineArguments)},
)
VaccineAxolotlArgs.__doc__ = "Vaccine's keys in an Axolotl YAML (`VaccineArguments`' fields); unset: Axolotl's run."


@functools.cache
def vaccine_axolotl_trainer() -> type:
    """`VaccineMixin` over `AxolotlTrainer`, built on first use: importing Axolotl's trainers is slow."""
    from axolotl.core.trainers.base import AxolotlTrainer

    from ..trainer import VaccineMixin

    class VaccineAxolotlTrainer(VaccineMixin, AxolotlTrainer):
        """Axolotl's trainer with Vaccine's two-pass step; pass 1 runs in the contexts pass 2 runs in and counts
        no tokens (Axolotl's `compute_loss` counts them for its tokens-per-second figures)."""

        tag_names = [*AxolotlTrainer.tag_names, "vaccine"]

        @contextlib.contextmanager
        def _vaccine_pass_one_context(self) -> Iterator[None]:
            had_tokens = hasattr(self.state, "tokens")
            tokens = dict(self.state.tokens) if had_tokens else None
            try:
                with contextlib.ExitStack() as stack:
                    for name in ("_layer_offload_ctx", "activation_offload_context"):  # pass 2's, in its order
                        context = getattr(self, name, None)
                        if context is not None:
                            stack.enter_context(context)
                    yield
            finally:
                if had_tokens:
                    self.state.tokens = tokens
                elif hasattr(self.state, "tokens"):
                    del self.state.tokens

    return VaccineAxolotlTrainer


class VaccinePlugin(BasePlugin):
    """Axolotl plugin: `rho:` in the YAML switches Vaccine on for SFT runs; every other run is left alone."""

    def get_input_args(self) -> str:
        return f"{__name__}.VaccineAxolotlArgs"

    def get_training_args_mixin(self) -> str:
        return f"{VaccineArguments.__module__}.VaccineArguments"

    def get_training_args(self, cfg) -> dict[str, Any]:
        if not vaccine_enabled(cfg):
            return {}
        return {key: cfg[key] for key in VACCINE_KEYS if cfg.get(key) is not None}

    def get_trainer_cls(self, cfg) -> type | None:
        if not vaccine_enabled(cfg):
            return None
        mode = _refused_mode(cfg)
        if mode is not None:  # also checked when the YAML is validated; a config built in code reaches here
            raise ValueError(f"Vaccine aligns with supervised fine-tuning; {mode} is not supported.")
        return vaccine_axolotl_trainer()
