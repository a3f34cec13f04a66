"""Vaccine inside other fine-tuning tools; each module imports its tool and is loaded only by it."""
