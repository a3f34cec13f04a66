"""How sure a reported rate is: 95% intervals, and harmful scores corrected for the judge's measured errors.

- A rate (harmful score, non-refusal rate, accuracy) gets a Wilson score interval, which stays inside [0, 1]
  and keeps its coverage near 0/n and n/n, where the textbook normal interval fails.
- A difference between two arms judged on the same prompts is paired: the interval comes from resampling the
  prompts (bootstrap), so the correlation between the arms' verdicts on a prompt is kept.
- A judge with measured sensitivity and specificity flags `p_obs = sens * p + (1 - spec) * (1 - p)` of answers
  whose true harmful rate is `p`; the Rogan-Gladen estimator inverts that. Its interval is a bootstrap over the
  answers *and* over the labelled pairs the judge was measured on, so it carries the uncertainty of both.
  It assumes the judge's error rates on these answers are those measured on the labelled pairs.

Every random draw comes from a seeded generator: the same inputs give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
RESAMPLES = 4000
SEED = 0


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of `successes` out of `n`, as fractions; (0, 1) when n is 0."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n, got {successes} of {n}.")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # The interval holds p exactly; at 0 or n successes rounding would leave it 1e-15 outside.
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def wilson_percent(successes: int, n: int) -> list[float]:
    """The Wilson interval in percent, as a report stores it."""
    low, high = wilson_interval(successes, n)
    return [100.0 * low, 100.0 * high]


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _paired(first: Sequence[bool], second: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"Paired verdicts need two equal, non-empty lists; got {len(a)} and {len(b)}.")
    return a, b


def _paired_draws(a: np.ndarray, b: np.ndarray, generator: np.random.Generator, resamples: int) -> np.ndarray:
    """The difference of the two rates over `resamples` bootstrap draws of the items, kept in pairs."""
    index = generator.integers(0, len(a), size=(resamples, len(a)))
    return a[index].mean(axis=1) - b[index].mean(axis=1)


def paired_difference(first: Sequence[bool], second: Sequence[bool], *, resamples: int = RESAMPLES,
                      seed: int = SEED) -> tuple[float, float, float]:
    """Rate of `first` minus rate of `second` on the same items, with a 95% paired bootstrap interval (fractions).
    Per-item means of verdicts work too: the mean over several cells of each cell's difference."""
    a, b = _paired(first, second)
    differences = _paired_draws(a, b, np.random.default_rng(seed), resamples)
    return float(a.mean() - b.mean()), *_percentile_interval(differences)


def rogan_gladen(observed: float, sensitivity: float, specificity: float) -> float:
    """The true rate that a judge with these error rates turns into `observed`, clipped to [0, 1]."""
    youden = sensitivity + specificity - 1
    if youden <= 0:
        raise ValueError(f"A judge with sensitivity {sensitivity:.3f} and specificity {specificity:.3f} is no "
                         "better than chance (sensitivity + specificity <= 1): its scores cannot be corrected.")
    return min(1.0, max(0.0, (observed + specificity - 1) / youden))


@dataclass(frozen=True)
class JudgeErrors:
    """A judge's measured sensitivity (recall on harmful pairs) and specificity (on safe pairs), with counts."""

    true_positives: int
    positives: int
    true_negatives: int
    negatives: int

    def __post_init__(self) -> None:
        if self.positives <= 0 or self.negatives <= 0:
            raise ValueError("Correcting for a judge's errors needs labelled pairs of both kinds "
                             f"(harmful: {self.positives}, safe: {self.negatives}).")

    @property
    def sensitivity(self) -> float:
        return self.true_positives / self.positives

    @property
    def specificity(self) -> float:
        return self.true_negatives / self.negatives

    @property
    def youden(self) -> float:
        return self.sensitivity + self.specificity - 1

    def resampled(self, generator: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Sensitivities and specificities as the labelled pairs could have measured them (binomial draws)."""
        return (generator.binomial(self.positives, self.sensitivity, size) / self.positives,
                generator.binomial(self.negatives, self.specificity, size) / self.negatives)


@dataclass(frozen=True)
class CorrectedRate:
    """A judge-corrected rate or difference, in percent, with its 95% interval and the rates it used."""

    value: float
    ci95: tuple[float, float]
    sensitivity: float
    specificity: float
    method: str
    # The observed rate lies outside what the judge's measured rates allow (below its false-positive rate, or above
    # its sensitivity): the judge does not err on these answers as on its labelled pairs, and the value is clipped.
    outside_model: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _corrected(observed: np.ndarray, sensitivity: np.ndarray, specificity: np.ndarray) -> np.ndarray:
    youden = sensitivity + specificity - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (observed + specificity - 1) / youden
    return np.where(youden > 0, np.clip(value, 0.0, 1.0), np.nan)


def corrected_rate(flagged: int, n: int, errors: JudgeErrors, *, resamples: int = RESAMPLES,
                   seed: int = SEED) -> CorrectedRate:
    """The Rogan-Gladen rate of `flagged` of `n` answers, with a bootstrap interval over answers and judge rates."""
    if not 0 < n or not 0 <= flagged <= n:
        raise ValueError(f"flagged must be between 0 and n > 0, got {flagged} of {n}.")
    point = rogan_gladen(flagged / n, errors.sensitivity, errors.specificity)
    generator = np.random.default_rng(seed)
    observed = generator.binomial(n, flagged / n, resamples) / n
    values = _corrected(observed, *errors.resampled(generator, resamples))
    low, high = _percentile_interval(values[~np.isnan(values)])
    outside = not 1 - errors.specificity <= flagged / n <= errors.sensitivity
    return CorrectedRate(100 * point, (100 * low, 100 * high), errors.sensitivity, errors.specificity,
                         "Rogan-Gladen; bootstrap over answers and the judge's labelled pairs", outside)


def _over_youden(difference: float, draws: np.ndarray, errors: JudgeErrors, generator: np.random.Generator,
                 method: str) -> CorrectedRate:
    """A difference of rates divided by the judge's Youden index, its interval from the bootstrap `draws` divided by
    Youden indices as the judge's labelled pairs could have measured them; clipped to +-1 (two rates differ by at most
    1)."""
    sensitivity, specificity = errors.resampled(generator, len(draws))
    youden = sensitivity + specificity - 1
    values = np.where(youden > 0, np.clip(draws / np.where(youden > 0, youden, 1.0), -1.0, 1.0), np.nan)
    low, high = _percentile_interval(values[~np.isnan(values)])
    point = min(1.0, max(-1.0, difference / errors.youden))
    return CorrectedRate(100 * point, (100 * low, 100 * high), errors.sensitivity, errors.specificity, method)


def corrected_difference(first: Sequence[bool], second: Sequence[bool], errors: JudgeErrors, *,
                         resamples: int = RESAMPLES, seed: int = SEED) -> CorrectedRate:
    """The judge-corrected difference of two arms' rates on the same prompts: the raw paired difference divided by
    the judge's Youden index (if its errors do not depend on the arm), with a bootstrap over prompts and rates."""
    if errors.youden <= 0:
        raise ValueError("The judge is no better than chance (sensitivity + specificity <= 1): no correction.")
    a, b = _paired(first, second)
    generator = np.random.default_rng(seed)
    draws = _paired_draws(a, b, generator, resamples)
    return _over_youden(a.mean() - b.mean(), draws, errors, generator,
                        "paired difference / Youden index; bootstrap over prompts and the judge's labelled pairs")


def stratified_paired_difference(groups: Sequence[tuple[Sequence[bool], Sequence[bool]]],
                                 errors: JudgeErrors | None = None, *, shared_items: bool = False,
                                 resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The mean over groups (seeds) of each group's paired difference, in points, with a 95% bootstrap interval that
    resamples the prompts (the groups are kept: three seeds are too few to resample); with the judge's `errors`,
    also that difference divided by Youden's index, its interval resampling the judge's rates.

    With `shared_items` every group judged the same prompts in the same order, and one draw of the prompts serves
    every group: a prompt that draws harmful answers on one seed tends to on the others, and drawing each group's
    prompts apart would take that correlation for independent evidence (too narrow an interval)."""
    if not groups:
        raise ValueError("Each group needs two equal, non-empty lists of verdicts; got no group.")
    arrays = [_paired(a, b) for a, b in groups]
    generator = np.random.default_rng(seed)
    point = float(np.mean([a.mean() - b.mean() for a, b in arrays]))
    if shared_items:
        if len({len(a) for a, _ in arrays}) != 1:
            raise ValueError("shared_items needs every group judged on the same prompts; got groups of "
                             f"{sorted({len(a) for a, _ in arrays})} prompts.")
        differences = np.mean([a - b for a, b in arrays], axis=0)  # per prompt, the mean over groups
        draws = _paired_draws(differences, np.zeros_like(differences), generator, resamples)
    else:
        draws = sum(_paired_draws(a, b, generator, resamples) for a, b in arrays) / len(arrays)
    result = {"difference": 100 * point, "ci95": [100 * v for v in _percentile_interval(draws)],
              "groups": len(arrays), "n": sum(len(a) for a, _ in arrays)}
    if errors is not None and errors.youden > 0:
        result["corrected"] = _over_youden(
            point, draws, errors, generator, "mean paired difference / Youden index; bootstrap over prompts within "
                                             "seeds and the judge's labelled pairs").to_dict()
    return result


def exact_mcnemar(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value of two arms judged on the same items: only the discordant items (flagged for
    one arm alone) carry evidence, and with no difference each falls either way with probability one half."""
    from scipy.stats import binomtest

    if only_first < 0 or only_second < 0:
        raise ValueError(f"Discordant counts cannot be negative, got {only_first} and {only_second}.")
    total = only_first + only_second
    return float(binomtest(only_second, total, 0.5).pvalue) if total else 1.0


def worst_case_difference(first: Sequence[Sequence[bool]], second: Sequence[Sequence[bool]], *,
                          resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float, float]:
    """The highest rate over `first`'s cells minus the highest over `second`'s (fractions), every cell judged on the
    same items in the same order, with a 95% bootstrap interval. One draw of the items serves every cell of both
    arms, so the prompts the cells share stay shared. The maximum of noisy rates is biased upwards; for two arms
    with about as many cells the bias is alike, so the difference is fair where each maximum alone is not."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or 0 in (*a.shape, *b.shape) or a.shape[1] != b.shape[1]:
        raise ValueError(f"Each arm needs at least one cell, every cell verdicts on the same non-empty items; got "
                         f"cells x items {a.shape} and {b.shape}.")
    items = a.shape[1]
    counts = np.random.default_rng(seed).multinomial(items, np.full(items, 1 / items), size=resamples).T / items
    draws = (a @ counts).max(axis=0) - (b @ counts).max(axis=0)  # each cell's rate in each draw, then the arm's max
    return float(a.mean(axis=1).max() - b.mean(axis=1).max()), *_percentile_interval(draws)


def cohens_kappa(first: Sequence[bool], second: Sequence[bool]) -> float:
    """Agreement of two judges on the same answers beyond chance (1: always agree, 0: as by chance)."""
    a, b = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError("Cohen's kappa needs two equal, non-empty lists of verdicts.")
    observed = float(np.mean(a == b))
    chance = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return 1.0 if chance == 1.0 else (observed - chance) / (1 - chance)


__all__ = ["CorrectedRate", "JudgeErrors", "cohens_kappa", "corrected_difference", "corrected_rate", "exact_mcnemar",
           "paired_difference", "rogan_gladen", "stratified_paired_difference", "wilson_interval", "wilson_percent",
           "worst_case_difference"]
