"""Vaccine: perturbation-aware alignment (Huang, Hu, Liu, NeurIPS 2024) for the HF Trainer.

Names are imported on first use (module ``__getattr__``): ``import vaccine_trainer`` costs nothing, and
``from vaccine_trainer import VaccineTrainer`` does not import TRL.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


class _OptionalKernelNotice(logging.Filter):
    """bitsandbytes warns on import (transformers and peft import it) that an optional CPU kernel for 4-bit
    matmuls is missing, also for users who never load a 4-bit model; that one record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())

_EXPORTS = {
    "VaccineArguments": "config",
    "VaccineTrainingArguments": "config",
    "find_vaccine_modules": "layers",
    "VaccineMixin": "trainer",
    "VaccineTrainer": "trainer",
    "AlignmentDriftCallback": "callbacks",
    "AlignedSFTConfig": "sft",
    "AlignedSFTTrainer": "sft",
    "VaccineSFTConfig": "sft",
    "VaccineSFTTrainer": "sft",
    "merge_alignment_adapter": "sft",
    "load_finetuned_model": "stage2_output",
}

__all__ = [
    "AlignedSFTConfig", "AlignedSFTTrainer", "AlignmentDriftCallback", "VaccineArguments", "VaccineMixin",
    "VaccineSFTConfig", "VaccineSFTTrainer", "VaccineTrainer", "VaccineTrainingArguments", "find_vaccine_modules",
    "load_finetuned_model", "merge_alignment_adapter",
]

if TYPE_CHECKING:
    from .callbacks import AlignmentDriftCallback
    from .config import VaccineArguments, VaccineTrainingArguments
    from .layers import find_vaccine_modules
    from .sft import AlignedSFTConfig, AlignedSFTTrainer, VaccineSFTConfig, VaccineSFTTrainer, merge_alignment_adapter
    from .stage2_output import load_finetuned_model
    from .trainer import VaccineMixin, VaccineTrainer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vaccine_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
