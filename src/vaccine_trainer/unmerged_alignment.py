"""Stage 2 over a base whose weights cannot take the alignment adapter: a 4-bit (QLoRA) base.

Stage 2 normally merges the alignment adapter into the base weights and trains a fresh adapter on top. A 4-bit
base cannot be merged into without losing the quantization, so there the alignment adapter stays a frozen
adapter over the quantized base and the fresh one trains beside it: both are active in every forward, only the
fresh one has gradients. The aligned model (the drift's reference) is the base with the alignment adapter alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

ALIGNMENT_ADAPTER = "alignment"
STAGE2_ADAPTER = "default"  # the fresh adapter: PEFT's default name, so it saves at the output's root


def is_quantized(model: nn.Module) -> bool:
    """True for a model loaded in 4 or 8 bits by bitsandbytes (its weights cannot take a merge)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def attach_beside_alignment(model: nn.Module, alignment_folder: str, peft_config: Any,
                            gradient_checkpointing: bool = False):
    """`model` (a base, quantized or not) with the alignment adapter frozen and a fresh `peft_config` adapter
    trainable, both active."""
    from peft import PeftModel, prepare_model_for_kbit_training

    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model = PeftModel.from_pretrained(model, alignment_folder, adapter_name=ALIGNMENT_ADAPTER, is_trainable=False)
    model.add_adapter(STAGE2_ADAPTER, peft_config)
    _activate_both(model)
    return model


def _activate_both(model) -> None:
    model.base_model.set_adapter([ALIGNMENT_ADAPTER, STAGE2_ADAPTER])  # makes every active adapter trainable
    for name, parameter in model.named_parameters():
        if f".{ALIGNMENT_ADAPTER}." in name:
            parameter.requires_grad_(False)
    model.active_adapter = STAGE2_ADAPTER  # what saving and the Trainer treat as the model's adapter


def has_unmerged_alignment(model: nn.Module) -> bool:
    return ALIGNMENT_ADAPTER in (getattr(model, "peft_config", None) or {})


@contextlib.contextmanager
def aligned_only(model) -> Iterator[None]:
    """The aligned model for the block: the alignment adapter alone active; both again after, the fresh one the
    only trainable."""
    model.base_model.set_adapter([ALIGNMENT_ADAPTER])
    try:
        yield
    finally:
        _activate_both(model)
