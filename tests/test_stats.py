"""The papers' statistics against known answers and an independent formula."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from nbutils.stats import CellSummary, benjamini_hochberg, delta_improvement, welch_less


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
