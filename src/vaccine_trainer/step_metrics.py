"""The `vaccine/*` figures between two logs: one `add(key, value)` per figure, reduced over processes once.

Each figure is the mean of the values added since the last log, over every process (summed, then divided by
the count): a micro-batch that was not perturbed adds no grad norm, so it does not pull the mean down. Values
may be tensors; they are read back at log time only, not every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

# Every process reduces the same keys in the same order, whatever it added.
KEYS = ("clean_loss", "grad_norm", "perturbation_norm", "perturbation_kept")


class StepMetrics:
    """Sums and counts of the figures since the last log (as TRL's trainers keep their `_metrics`)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._sums: dict[str, float | torch.Tensor] = dict.fromkeys(KEYS, 0.0)
        self._counts = dict.fromkeys(KEYS, 0)

    def add(self, key: str, value: float | torch.Tensor) -> None:
        if key not in self._sums:
            raise KeyError(f"unknown Vaccine metric {key!r}; known: {', '.join(KEYS)}")
        self._sums[key] = self._sums[key] + value
        self._counts[key] += 1

    def means(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, device: str | torch.device = "cpu",
              totals: Mapping[str, float] | None = None) -> dict[str, float]:
        """`vaccine/<key>`: the mean over every process of each figure that was added, and each of `totals`
        summed over the processes; `reduce` sums a tensor over the processes (None: one process)."""
        totals = dict(totals or {})
        values = torch.tensor([*(float(self._sums[k]) for k in KEYS), *(self._counts[k] for k in KEYS),
                               *totals.values()], dtype=torch.float64, device=device)
        if reduce is not None:
            values = reduce(values)
        values = values.tolist()
        sums, counts, summed = values[:len(KEYS)], values[len(KEYS):2 * len(KEYS)], values[2 * len(KEYS):]
        logs = {f"vaccine/{key}": total / count for key, total, count in zip(KEYS, sums, counts) if count > 0}
        logs.update({f"vaccine/{key}": int(value) for key, value in zip(totals, summed)})
        return logs
