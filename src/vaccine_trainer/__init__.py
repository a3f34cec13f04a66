"""Vaccine: perturbation-aware alignment (Huang, Hu, Liu, NeurIPS 2024) for the HF Trainer."""

from .config import VaccineArguments, VaccineTrainingArguments
from .layers import find_vaccine_modules
from .trainer import VaccineMixin, VaccineTrainer

__version__ = "0.1.0"

__all__ = [
    "VaccineArguments",
    "VaccineMixin",
    "VaccineTrainer",
    "VaccineTrainingArguments",
    "find_vaccine_modules",
]
