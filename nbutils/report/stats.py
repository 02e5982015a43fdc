"""The papers' statistics: Acc (mean and std over trials), dImp against random sampling,
one-sided Welch t-tests against the clean condition, Benjamini-Hochberg across the p-values
of one NAS algorithm.

Standard deviations are sample standard deviations (``ddof=1``), the usual choice for
reporting the spread of a handful of trials.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower


@dataclass(frozen=True)
class CellSummary:
    n: int
    mean: float
    std: float

    @classmethod
    def of(cls, values) -> "CellSummary":
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return cls(0, math.nan, math.nan)
        std = float(values.std(ddof=1)) if values.size > 1 else math.nan
        return cls(int(values.size), float(values.mean()), std)


def delta_improvement(mean_acc: float, random_mean_acc: float) -> float:
    """dImp: percentage-point change of accuracy relative to random sampling (inputs in percent)."""
    return mean_acc - random_mean_acc


def welch_less(poisoned, clean) -> float:
    """One-sided Welch t-test, H1: the poisoned mean is lower than the clean mean.

    NaN when the test is undefined (fewer than two values on a side, or no variance at all).
    """
    poisoned = np.asarray(poisoned, dtype=np.float64)
    clean = np.asarray(clean, dtype=np.float64)
    if poisoned.size < 2 or clean.size < 2:
        return math.nan
    if poisoned.var(ddof=1) == 0 and clean.var(ddof=1) == 0:
        return math.nan
    # scipy warns of "catastrophic cancellation" when one side's trials are all equal (a
    # retraining that lands on the same accuracy twice): the test is still the right one
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        return float(sps.ttest_ind(poisoned, clean, equal_var=False, alternative="less").pvalue)


def benjamini_hochberg(pvalues, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Reject flags and adjusted p-values; NaN p-values stay NaN and are never rejected."""
    pvalues = np.asarray(pvalues, dtype=np.float64)
    reject = np.zeros(pvalues.shape, dtype=bool)
    adjusted = np.full(pvalues.shape, np.nan)
    finite = np.isfinite(pvalues)
    if finite.any():
        r, adj, _, _ = multipletests(pvalues[finite], alpha=alpha, method="fdr_bh")
        reject[finite], adjusted[finite] = r, adj
    return reject, adjusted


def dimp_interval(accs, random_accs, confidence: float = 0.95) -> tuple[float, float]:
    """Welch confidence interval of dImp = mean(accs) - mean(random_accs), in the inputs' units.

    The difference of two independent means with unequal variances: ``d +- t * se`` with
    ``se = sqrt(s1^2/n1 + s2^2/n2)`` and the Welch-Satterthwaite degrees of freedom. NaN when
    either side has fewer than two values or both have no spread."""
    a, b = np.asarray(accs, dtype=np.float64), np.asarray(random_accs, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return math.nan, math.nan
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    if va + vb == 0:
        return math.nan, math.nan
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = float(sps.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(va + vb)
    d = float(a.mean() - b.mean())
    return d - half, d + half


def detectable_drop(std: float, n_poisoned: int, n_clean: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest drop of mean accuracy (same units as ``std``) that a one-sided two-sample
    t-test at level ``alpha`` detects with probability ``power``, for trials with standard
    deviation ``std``: Cohen's d from statsmodels' power analysis, times ``std``. It tells
    which "no significant drop" verdicts are merely underpowered. NaN when undefined."""
    if not (n_poisoned >= 2 and n_clean >= 2 and math.isfinite(std) and std > 0):
        return math.nan
    d = TTestIndPower().solve_power(effect_size=None, nobs1=n_poisoned, alpha=alpha, power=power,
                                    ratio=n_clean / n_poisoned, alternative="larger")
    return float(np.atleast_1d(d)[0]) * std
