"""The vaccine/* figures: the mean of what was added since the last log, over micro-batches and processes."""

from __future__ import annotations

import pytest
import torch

from vaccine_trainer.step_metrics import StepMetrics


def test_each_figure_is_the_mean_of_what_was_added_and_absent_when_nothing_was():
    metrics = StepMetrics()
    metrics.add("grad_norm", 1.0)
    metrics.add("grad_norm", 3.0)
    metrics.add("clean_loss", torch.tensor(2.5))  # tensors are read back at log time
    assert metrics.means(totals={"skipped_steps": 1}) == {
        "vaccine/clean_loss": 2.5, "vaccine/grad_norm": 2.0, "vaccine/skipped_steps": 1}
    metrics.clear()
    assert metrics.means() == {}
    with pytest.raises(KeyError, match="unknown Vaccine metric 'grad'"):
        metrics.add("grad", 1.0)


def test_processes_are_reduced_once_sums_and_counts_together():
    """Two processes, one of which perturbed nothing: the mean is over the micro-batches that added a value."""
    first, second = StepMetrics(), StepMetrics()
    first.add("grad_norm", 4.0)
    first.add("grad_norm", 2.0)
    second.add("clean_loss", 1.0)
    sent = []
    second.means(lambda values: sent.append(values) or values, totals={"skipped_steps": 2})
    reductions = []

    def reduce(values: torch.Tensor) -> torch.Tensor:  # the sum over the two processes
        reductions.append(values)
        return values + sent[0]

    logs = first.means(reduce, totals={"skipped_steps": 1})
    assert len(reductions) == 1  # one reduction per log
    assert logs == {"vaccine/clean_loss": 1.0, "vaccine/grad_norm": 3.0, "vaccine/skipped_steps": 3}
