"""The papers' statistics: Acc (mean and std over trials), dImp against random sampling,
one-sided Welch t-tests against the clean condition, Benjamini-Hochberg across the p-values
of one NAS algorithm.

Standard deviations are sample standard deviations (``ddof=1``), the usual choice for
reporting the spread of a handful of trials.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests


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
