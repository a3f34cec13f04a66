"""What Vaccine reads of `trl.SFTTrainer` that TRL does not offer publicly, in one place.

Pass 1 runs TRL's own `compute_loss`, which appends to the trainer's metrics and counts tokens; a plain
`SFTTrainer` does that once per micro-batch, so pass 1's records are taken back out (and kept, to report the
clean forward's entropy and accuracy). T-Vaccine's probe rows are tokenized by TRL's own preparation, as the
training rows are. TRL 1.x has no public hook for either; this module names the private members it depends
on, and `check_trl_internals` fails at start-up, with the TRL version, if a release renames them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# SFTTrainer members used here: metrics per mode, the token counter, and the dataset preparation.
REQUIRED_MEMBERS = ("_metrics", "_total_train_tokens", "_prepare_dataset", "_formatting_func")


def check_trl_internals(trainer) -> None:
    missing = [name for name in REQUIRED_MEMBERS if not hasattr(trainer, name)]
    if missing:
        import trl

        raise RuntimeError(f"VaccineSFTTrainer relies on SFTTrainer's {missing}, which TRL {trl.__version__} does "
                           "not have: install the TRL version in constraints.txt (or report the new one).")


@contextlib.contextmanager
def compute_loss_records_undone(trainer, clean: dict) -> Iterator[None]:
    """Undo, when the block ends, what `compute_loss` recorded in it (train metrics, token count); what it
    appended to each metric goes into `clean`."""
    metrics = trainer._metrics["train"]
    saved_metrics = {key: list(values) for key, values in metrics.items()}
    saved_tokens = trainer._total_train_tokens
    try:
        yield
    finally:
        clean.clear()
        clean.update({key: values[len(saved_metrics.get(key, ())):] for key, values in metrics.items()})
        metrics.clear()
        metrics.update(saved_metrics)
        trainer._total_train_tokens = saved_tokens


@contextlib.contextmanager
def metrics_replaced_by(trainer, clean: dict) -> Iterator[None]:
    """Over the block (a training step), the metric values appended replace by `clean`'s (token counts kept)."""
    metrics = trainer._metrics["train"]
    before = {key: len(values) for key, values in metrics.items()}
    clean.clear()
    yield
    for key, values in clean.items():
        if key != "num_tokens":
            metrics[key][before.get(key, 0):] = values


def tokenize_like_training(trainer, dataset, name: str):
    """`dataset` tokenized by TRL's own preparation of training data (template, completion mask, truncation)."""
    return trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, False,
                                    trainer._formatting_func, name)
