"""Vaccine: perturbation-aware alignment (Huang, Hu, Liu, NeurIPS 2024) for the HF Trainer."""

from .config import VaccineArguments, VaccineTrainingArguments
from .layers import find_vaccine_modules
from .trainer import VaccineMixin, VaccineTrainer
from .callbacks import AlignmentDriftCallback
from .sft import AlignedSFTConfig, AlignedSFTTrainer, VaccineSFTConfig, VaccineSFTTrainer, merge_alignment_adapter

__version__ = "0.1.0"

__all__ = [
    "VaccineArguments",
    "VaccineMixin",
    "VaccineTrainer",
    "VaccineTrainingArguments",
    "find_vaccine_modules",
    "AlignedSFTConfig",
    "AlignedSFTTrainer",
    "AlignmentDriftCallback",
    "VaccineSFTConfig",
    "VaccineSFTTrainer",
    "merge_alignment_adapter",
]
