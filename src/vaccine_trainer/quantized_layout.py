"""4-bit weights kept in the layout that trains, on CPUs where bitsandbytes would repack them for inference.

On a CPU with AVX512-BF16, bitsandbytes repacks a `Linear4bit`'s weight in place at its first forward in eval mode
without gradients (an evaluation, the stage-2 drift measurement), for a faster inference kernel with bf16 scales.
That kernel has no backward: every later training forward through the layer silently drops the gradient of its
input, so the adapters below it train on a wrong gradient (measured: the input's gradient is `None`, with only a
PyTorch warning). While a trainer trains, the repacking is turned off, a weight already repacked is restored to the
training layout, and the layers are left as they were found when training ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

_REPACKS_FOR_INFERENCE = "support_avx512bf16_for_cpu"  # bitsandbytes' switch on each Linear4bit


@contextlib.contextmanager
def trainable_4bit_layout(model: nn.Module) -> Iterator[None]:
    """No inference repacking of the model's 4-bit layers for the block; a no-op for a model without them."""
    layers = [module for module in model.modules() if getattr(module, _REPACKS_FOR_INFERENCE, False)]
    restored = sum(_restore_training_layout(layer) for layer in layers)
    if restored:
        logger.warning(
            f"{restored} 4-bit layers had been repacked by bitsandbytes for CPU inference (an eval forward before "
            "training); they are restored to the layout that trains, with the scales that repacking rounded to bf16.")
    for layer in layers:
        setattr(layer, _REPACKS_FOR_INFERENCE, False)
    try:
        yield
    finally:
        for layer in layers:
            setattr(layer, _REPACKS_FOR_INFERENCE, True)


def _restore_training_layout(layer: nn.Module) -> bool:
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # what bitsandbytes saves with

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return True
