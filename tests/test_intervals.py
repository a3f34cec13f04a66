"""Intervals and judge-corrected rates against hand computations and a simulation with known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vaccine_harness.evaluation.intervals import (
    Z95, JudgeErrors, cohens_kappa, corrected_difference, corrected_rate, paired_difference, rogan_gladen,
    wilson_interval,
)


def wilson_by_the_other_form(k: int, n: int) -> tuple[float, float]:
    """(2k + z^2 -+ z sqrt(z^2 + 4k(n-k)/n)) / (2(n + z^2)): the same interval written another way."""
    z = Z95
    root = z * math.sqrt(z * z + 4 * k * (n - k) / n)
    return (2 * k + z * z - root) / (2 * (n + z * z)), (2 * k + z * z + root) / (2 * (n + z * z))


@pytest.mark.parametrize("k, n, expected", [
    (0, 10, (0.0, 0.2775)),      # upper bound z^2 / (n + z^2)
    (10, 10, (0.7225, 1.0)),
    (60, 200, (0.2407, 0.3668)),
    (0, 200, (0.0, 0.0188)),
])
def test_wilson_against_known_values(k, n, expected):
    low, high = wilson_interval(k, n)
    assert (low, high) == pytest.approx(expected, abs=1e-4)
    assert (low, high) == pytest.approx(wilson_by_the_other_form(k, n), abs=1e-12)


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_rogan_gladen_by_hand():
    # 40% flagged by a judge with sensitivity 0.8 and specificity 0.7: (0.4 + 0.7 - 1) / (0.8 + 0.7 - 1) = 0.2
    assert rogan_gladen(0.4, 0.8, 0.7) == pytest.approx(0.2)
    assert rogan_gladen(0.1, 0.8, 0.7) == 0.0  # below the false-positive floor: clipped
    with pytest.raises(ValueError, match="no better than chance"):
        rogan_gladen(0.4, 0.5, 0.5)


def test_corrected_rate_point_and_rates():
    errors = JudgeErrors(true_positives=80, positives=100, true_negatives=70, negatives=100)
    result = corrected_rate(80, 200, errors)
    assert result.value == pytest.approx(20.0)
    assert (result.sensitivity, result.specificity) == (0.8, 0.7)
    assert result.ci95[0] < 20.0 < result.ci95[1]
    assert corrected_rate(80, 200, errors).ci95 == result.ci95  # seeded: the same interval every time
    with pytest.raises(ValueError, match="both kinds"):
        JudgeErrors(1, 1, 0, 0)


def test_the_corrected_interval_covers_the_true_rate_in_at_least_93_of_100_draws():
    """A synthetic judge with known rates on synthetic answers: the interval must carry both uncertainties."""
    true_rate, sensitivity, specificity, n, labelled = 0.3, 0.8, 0.75, 200, 300
    covered = 0
    for seed in range(100):
        rng = np.random.default_rng(1000 + seed)
        harmful = rng.random(n) < true_rate
        flags = np.where(harmful, rng.random(n) < sensitivity, rng.random(n) < 1 - specificity)
        errors = JudgeErrors(int(rng.binomial(labelled, sensitivity)), labelled,
                             int(rng.binomial(labelled, specificity)), labelled)
        low, high = corrected_rate(int(flags.sum()), n, errors, seed=seed).ci95
        covered += low <= 100 * true_rate <= high
    assert covered >= 93


def test_paired_difference_by_hand():
    first = [True, True, True, False, False, False, True, False]
    second = [True, False, False, False, False, False, True, False]
    difference, low, high = paired_difference(first, second)
    assert difference == pytest.approx(0.25)
    assert low <= 0.25 <= high and high <= 0.75 and low >= 0.0  # never below 0: `first` is never lower
    assert paired_difference(first, first)[1:] == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_difference(first, second[:-1])


def test_corrected_difference_is_the_raw_one_over_youdens_index():
    errors = JudgeErrors(80, 100, 70, 100)  # J = 0.5
    first = [True] * 30 + [False] * 70
    second = [True] * 20 + [False] * 80
    result = corrected_difference(first, second, errors)
    assert result.value == pytest.approx(20.0)  # (30% - 20%) / 0.5
    assert result.ci95[0] < 20.0 < result.ci95[1]


def test_cohens_kappa_by_hand():
    # agree on 3 of 4; rates 1/2 and 1/4: chance agreement 1/2 * 1/4 + 1/2 * 3/4 = 1/2; kappa = (3/4 - 1/2) / (1/2)
    assert cohens_kappa([True, True, False, False], [True, False, False, False]) == pytest.approx(0.5)
    assert cohens_kappa([True, False], [True, False]) == 1.0


def test_stratified_paired_difference_is_the_mean_of_the_seeds_differences():
    from vaccine_harness.evaluation.intervals import stratified_paired_difference

    seed_a = ([True] * 30 + [False] * 70, [True] * 20 + [False] * 80)   # -10 points the other way round: +10
    seed_b = ([True] * 10 + [False] * 90, [True] * 20 + [False] * 80)   # -10
    result = stratified_paired_difference([seed_a, seed_b], JudgeErrors(80, 100, 70, 100))
    assert result["difference"] == pytest.approx(0.0) and result["groups"] == 2 and result["n"] == 200
    assert result["ci95"][0] < 0.0 < result["ci95"][1]
    assert result["corrected"]["value"] == pytest.approx(0.0)
    one = stratified_paired_difference([seed_a])
    assert one["difference"] == pytest.approx(10.0) and "corrected" not in one
    assert one["ci95"] == pytest.approx([100 * v for v in paired_difference(*seed_a)[1:]], abs=1.5)


def test_a_rate_below_the_judges_false_positive_floor_is_marked():
    errors = JudgeErrors(80, 100, 70, 100)  # flags at least 30% of answers whatever their truth
    assert corrected_rate(40, 200, errors).outside_model and corrected_rate(40, 200, errors).value == 0.0
    assert not corrected_rate(80, 200, errors).outside_model


def test_a_corrected_difference_stays_within_100_points():
    errors = JudgeErrors(60, 100, 60, 100)  # J = 0.2: a 30-point raw difference would "correct" to 150
    result = corrected_difference([True] * 40 + [False] * 60, [True] * 10 + [False] * 90, errors)
    assert result.value == 100.0 and -100.0 <= result.ci95[0] <= result.ci95[1] <= 100.0


def test_exact_mcnemar_by_hand():
    from vaccine_harness.evaluation.intervals import exact_mcnemar

    assert exact_mcnemar(0, 5) == pytest.approx(2 / 2**5)  # all five discordant items one way: twice 1/32
    assert exact_mcnemar(5, 0) == exact_mcnemar(0, 5)
    # 21 against 27: twice P(X <= 21) for X ~ Binomial(48, 1/2)
    assert exact_mcnemar(21, 27) == pytest.approx(2 * sum(math.comb(48, k) for k in range(22)) / 2**48)
    assert exact_mcnemar(10, 10) == 1.0 and exact_mcnemar(0, 0) == 1.0
    with pytest.raises(ValueError):
        exact_mcnemar(-1, 3)


def test_worst_case_difference_by_hand_and_against_the_paired_bootstrap():
    from vaccine_harness.evaluation.intervals import worst_case_difference

    first = [[True, True, False, False], [True, False, False, False]]   # rates 1/2 and 1/4: the worst is 1/2
    second = [[True, False, False, False]]                              # 1/4
    point, low, high = worst_case_difference(first, second)
    assert point == pytest.approx(0.25) and 0.0 <= low <= point <= high  # `first`'s worst cell never flags less
    assert worst_case_difference(first, first) == (0.0, 0.0, 0.0)
    # one cell each: the worst-case difference is the paired difference, and so is its bootstrap distribution
    generator = np.random.default_rng(1)
    a, b = generator.random(200) < 0.55, generator.random(200) < 0.45
    single = worst_case_difference([a], [b])
    assert single[0] == pytest.approx(paired_difference(a, b)[0])
    assert single[1:] == pytest.approx(paired_difference(a, b)[1:], abs=0.015)
    with pytest.raises(ValueError):
        worst_case_difference(first, [[True, False]])  # other items
    with pytest.raises(ValueError):
        worst_case_difference([], second)


def test_seeds_judged_on_the_same_prompts_are_resampled_together():
    from vaccine_harness.evaluation.intervals import stratified_paired_difference

    generator = np.random.default_rng(2)
    first, second = generator.random(200) < 0.5, generator.random(200) < 0.4
    one = stratified_paired_difference([(first, second)])
    # two seeds with the very same verdicts carry no more evidence than one: drawn together, the interval is one
    # seed's; drawn apart, it would shrink by about 1 / sqrt(2)
    shared = stratified_paired_difference([(first, second), (first, second)], shared_items=True)
    apart = stratified_paired_difference([(first, second), (first, second)])
    assert shared["difference"] == pytest.approx(one["difference"])
    assert shared["ci95"] == pytest.approx(one["ci95"])
    assert apart["ci95"][1] - apart["ci95"][0] < 0.8 * (shared["ci95"][1] - shared["ci95"][0])
    with pytest.raises(ValueError):
        stratified_paired_difference([(first, second), (first[:100], second[:100])], shared_items=True)


@pytest.mark.parametrize("n", [1, 3, 7, 40, 200, 500])
def test_the_wilson_interval_holds_its_rate_exactly_at_the_ends(n):
    from vaccine_harness.evaluation.intervals import wilson_interval

    assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
    for successes in range(0, n + 1, max(1, n // 7)):
        low, high = wilson_interval(successes, n)
        assert low <= successes / n <= high
