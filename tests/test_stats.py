"""The papers' statistics against known answers and an independent formula."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from nbutils.report.stats import CellSummary, benjamini_hochberg, delta_improvement, detectable_drop, dimp_interval, welch_less


def welch_by_hand(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return sps.t.cdf(t, df)


def test_welch_known_answer():
    # means 2 and 5, variances 1 and 1, n = 3 each: t = -3.674, Welch df = 4, one-sided p = 0.0107
    assert welch_less([1, 2, 3], [4, 5, 6]) == pytest.approx(0.01065, abs=5e-5)


def test_welch_matches_the_formula_with_unequal_variances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(96.5, 0.4, size=7), rng.normal(97.0, 0.1, size=10)
    assert welch_less(a, b) == pytest.approx(welch_by_hand(a, b), rel=1e-10)


def test_welch_is_one_sided():
    low, high = [90.0, 91.0, 92.0], [95.0, 96.0, 97.0]
    assert welch_less(low, high) < 0.05 < welch_less(high, low)
    assert welch_less(low, high) + welch_less(high, low) == pytest.approx(1.0)


def test_welch_undefined_cases_are_nan():
    assert math.isnan(welch_less([1.0], [1.0, 2.0]))
    assert math.isnan(welch_less([1.0, 1.0], [1.0, 1.0]))


def test_benjamini_hochberg_known_answers():
    reject, adjusted = benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    assert reject.all()
    np.testing.assert_allclose(adjusted, [0.02, 0.04, 0.04, 0.02])
    reject, adjusted = benjamini_hochberg([0.01, 0.02, 0.03, 0.5])
    assert reject.tolist() == [True, True, True, False]
    np.testing.assert_allclose(adjusted, [0.04, 0.04, 0.04, 0.5])


def test_benjamini_hochberg_keeps_nan_out():
    reject, adjusted = benjamini_hochberg([0.001, math.nan, 0.8])
    assert reject.tolist() == [True, False, False]
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2]], [0.002, 0.8])


def test_cell_summary_and_dimp():
    s = CellSummary.of([97.0, 97.2, 97.4])
    assert (s.n, s.mean) == (3, pytest.approx(97.2))
    assert s.std == pytest.approx(0.2)  # sample standard deviation
    assert math.isnan(CellSummary.of([97.0]).std)
    assert delta_improvement(97.32, 96.73) == pytest.approx(0.59)


def test_dimp_interval_known_answer():
    # a: mean 2, var 1, n 3; b: mean 5, var 1, n 3 -> d = -3, se = sqrt(2/3), Welch df = 4
    low, high = dimp_interval([1, 2, 3], [4, 5, 6])
    half = sps.t.ppf(0.975, 4) * math.sqrt(2 / 3)
    assert (low, high) == pytest.approx((-3 - half, -3 + half), rel=1e-12)


def test_dimp_interval_covers_at_the_nominal_rate():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(2000):
        low, high = dimp_interval(rng.normal(1.0, 1.0, 5), rng.normal(0.0, 3.0, 8))
        hits += low <= 1.0 <= high
    assert 0.93 < hits / 2000 < 0.97


def test_detectable_drop_has_the_stated_power():
    """Simulated: a true drop of the detectable size is found by the one-sided Welch test at
    about the stated power (Welch is slightly conservative against the pooled t-test)."""
    drop = detectable_drop(1.0, 10, 10)
    assert 1.0 < drop < 1.3   # Cohen's d for n=10+10, alpha 0.05 one-sided, power 0.8 is 1.155
    rng = np.random.default_rng(2)
    found = np.mean([welch_less(rng.normal(-drop, 1, 10), rng.normal(0, 1, 10)) < 0.05 for _ in range(2000)])
    assert 0.75 < found < 0.85
    assert detectable_drop(1.0, 2, 2) > detectable_drop(1.0, 10, 10) > detectable_drop(1.0, 50, 50)
    assert math.isnan(detectable_drop(0.0, 5, 5)) and math.isnan(detectable_drop(1.0, 1, 5))


def test_welch_with_one_side_all_equal_is_quiet_and_defined():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = welch_less([9.375, 9.375], [10.9375, 9.375])
    assert 0 < p < 1
