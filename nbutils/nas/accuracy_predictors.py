"""Accuracy predictors (surrogates) of NSGANetV2, and their adaptive choice by Kendall's tau.

NSGANetV2 (Lu et al., 2020, Section 3.2; ``mikelzc1990/nsganetv2`` ``acc_predictor/``) fits a
cheap model from encoded architectures to their measured error and lets NSGA-II search on
its predictions. What matters for the search is the *ranking* the model gives, so models are
compared by Kendall's tau between predicted and measured values.

* ``rbf``: radial-basis-function interpolation, cubic kernel with a linear polynomial tail
  (pySOT's ``RBFInterpolant(CubicKernel, LinearTail)`` in the reference), here
  ``scipy.interpolate.RBFInterpolator``. The linear tail needs the training points to span
  their space affinely (at least ``d + 1`` points in general position); with fewer we fall
  back to the linear kernel with a constant tail, the next lower order that is still uniquely
  solvable. Repeated inputs are merged (their targets averaged), since an interpolant cannot
  pass through two values at one point.
* ``gp``: Gaussian-process regression with a constant mean, an isotropic squared-exponential
  correlation and fitted length scale and amplitude (the reference's DACE kriging:
  ``regr_constant``, ``corr_gauss``), here ``sklearn.gaussian_process.GaussianProcessRegressor``
  with normalised targets.
* ``cart``: an ensemble of regression trees on bootstrap samples (bagged CART), here
  ``sklearn.ensemble.RandomForestRegressor`` with every feature considered at every split,
  which makes each tree a plain CART.
* ``adaptive`` (the reference's ``AdaptiveSwitching``): split the data in ``folds`` parts;
  for each part fit every model on the rest and compute Kendall's tau (``scipy.stats.kendalltau``,
  tau-b) on the held-out part; choose the model with the largest ``mean - std`` of its
  per-fold taus, and refit it on all the data. Ties go to the earlier model in ``pool``.

Folds: at most ``n // 3`` (at least two), so that every held-out part has three points or
more and its tau means something; hence at least 6 training points. A held-out part whose
measured values are all equal carries no ranking information and is skipped; a model whose
predictions on a part are all equal (while the measured values are not) scores 0 there.

The models are small (tens to hundreds of points), where a multi-threaded BLAS only adds
overhead, and on a busy machine much of it (a 60 x 60 solve ran 100x slower with two
OpenBLAS threads than with one): fitting and predicting run with BLAS limited to one thread.
"""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, TypeVar

import lazy_loader
import numpy as np
from threadpoolctl import threadpool_limits

#: imported on first use (lazy_loader): scikit-learn takes ~0.5 s to import, and every notebook imports this module
sklearn = lazy_loader.load("sklearn")
#: imported on first use (lazy_loader): SciPy's submodules take ~1 s to import, and every notebook imports this module
scipy = lazy_loader.load("scipy")

log = logging.getLogger(__name__)

PREDICTORS: tuple[str, ...] = ("rbf", "gp", "cart")
#: What :func:`fit_predictor` accepts: one model, or the adaptive choice among them.
CHOICES: tuple[str, ...] = (*PREDICTORS, "adaptive")
MIN_POINTS = 6

F = TypeVar("F", bound=Callable)


def _one_blas_thread(function: F) -> F:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Predictor(Protocol):
    name: str

    def fit(self, X: np.ndarray, y: np.ndarray) -> "Predictor": ...

    def predict(self, X: np.ndarray) -> np.ndarray: ...


def _check_xy(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y) or len(X) == 0:
        raise ValueError(f"X must be n x d and y of length n (n >= 1), got shapes {X.shape} and {y.shape}")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y))):
        raise ValueError("X and y must be finite")
    return X, y


def _check_x(X: np.ndarray, dims: int) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != dims:
        raise ValueError(f"X must be n x {dims} (as in fit), got shape {X.shape}")
    return X


def _merge_repeats(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, inverse = np.unique(X, axis=0, return_inverse=True)
    if len(unique) == len(X):
        return X, y
    inverse = inverse.reshape(-1)
    return unique, np.bincount(inverse, weights=y) / np.bincount(inverse)


class RbfPredictor:
    """Cubic RBF interpolation with a linear tail (linear kernel, constant tail when the points
    do not span their space affinely)."""

    name = "rbf"

    @_one_blas_thread
    def fit(self, X: np.ndarray, y: np.ndarray) -> "RbfPredictor":
        X, y = _check_xy(X, y)
        X, y = _merge_repeats(X, y)
        spans = np.linalg.matrix_rank(np.column_stack([np.ones(len(X)), X])) == X.shape[1] + 1
        self.kernel, self.degree = ("cubic", 1) if spans else ("linear", 0)
        self._dims = X.shape[1]
        self._model = scipy.interpolate.RBFInterpolator(X, y, kernel=self.kernel, degree=self.degree)
        return self

    @_one_blas_thread
    def predict(self, X: np.ndarray) -> np.ndarray:
        return self._model(_check_x(X, self._dims))


class GpPredictor:
    """Kriging: constant mean, isotropic squared-exponential correlation, hyper-parameters by
    maximum likelihood (``n_restarts`` extra starts drawn with ``seed``)."""

    name = "gp"

    def __init__(self, seed: int = 0, n_restarts: int = 2):
        self.seed, self.n_restarts = seed, n_restarts

    @_one_blas_thread
    def fit(self, X: np.ndarray, y: np.ndarray) -> "GpPredictor":
        X, y = _check_xy(X, y)
        self._dims = X.shape[1]
        kernels = sklearn.gaussian_process.kernels
        kernel = kernels.ConstantKernel(1.0, (1e-3, 1e3)) * kernels.RBF(length_scale=1.0, length_scale_bounds=(1e-3, 1e3))
        self._model = sklearn.gaussian_process.GaussianProcessRegressor(kernel=kernel, alpha=1e-8, normalize_y=True,
                                               n_restarts_optimizer=self.n_restarts, random_state=self.seed)
        with warnings.catch_warnings():
            # a length scale at its bound is a legitimate fit on tiny archives; not worth a warning each time
            warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
            self._model.fit(X, y)
        return self

    @_one_blas_thread
    def predict(self, X: np.ndarray) -> np.ndarray:
        return self._model.predict(_check_x(X, self._dims))


class CartPredictor:
    """Bagged regression trees: ``trees`` fully grown CARTs, each on a bootstrap sample, averaged."""

    name = "cart"

    def __init__(self, seed: int = 0, trees: int = 100):
        self.seed, self.trees = seed, trees

    @_one_blas_thread
    def fit(self, X: np.ndarray, y: np.ndarray) -> "CartPredictor":
        X, y = _check_xy(X, y)
        self._dims = X.shape[1]
        # max_features=1.0: every split considers every feature, i.e. each tree is a plain CART
        self._model = sklearn.ensemble.RandomForestRegressor(n_estimators=self.trees, max_features=1.0, bootstrap=True,
                                                             random_state=self.seed)
        self._model.fit(X, y)
        return self

    @_one_blas_thread
    def predict(self, X: np.ndarray) -> np.ndarray:
        return self._model.predict(_check_x(X, self._dims))


def make_predictor(name: str, *, seed: int = 0, cart_trees: int = 100) -> Predictor:
    """An unfitted model by name (one of :data:`PREDICTORS`)."""
    if name == "rbf":
        return RbfPredictor()
    if name == "gp":
        return GpPredictor(seed=seed)
    if name == "cart":
        return CartPredictor(seed=seed, trees=cart_trees)
    raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {name!r}")


def kendall_tau(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Kendall's tau-b of two rankings; NaN when ``measured`` is constant (no ranking to match),
    0 when only ``predicted`` is constant (the model ranks nothing)."""
    predicted, measured = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if len(measured) < 2 or np.all(measured == measured[0]):
        return float("nan")
    if np.all(predicted == predicted[0]):
        return 0.0
    return float(scipy.stats.kendalltau(predicted, measured).statistic)


def fold_count(n: int, folds: int) -> int:
    """How many folds :func:`cross_validated_tau` uses for ``n`` points: ``min(folds, n // 3)``, at least 2."""
    return max(2, min(folds, n // 3))


@_one_blas_thread
def cross_validated_tau(name: str, X: np.ndarray, y: np.ndarray, *, folds: int = 10, seed: int = 0,
                        cart_trees: int = 100) -> np.ndarray:
    """Kendall's tau of model ``name`` on each held-out fold (NaN where the fold's targets are
    constant). The folds are a seeded random partition, the same for every model given ``seed``."""
    X, y = _check_xy(X, y)
    _check_folds(folds, len(X))
    order = np.random.default_rng(seed).permutation(len(X))
    taus = []
    for held_out in np.array_split(order, fold_count(len(X), folds)):
        train = np.setdiff1d(order, held_out, assume_unique=True)
        model = make_predictor(name, seed=seed, cart_trees=cart_trees).fit(X[train], y[train])
        taus.append(kendall_tau(model.predict(X[held_out]), y[held_out]))
    return np.asarray(taus)


def _check_folds(folds: int, n: int) -> None:
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    if n < MIN_POINTS:
        raise ValueError(f"cross-validation needs at least {MIN_POINTS} points, got {n}")


@dataclass
class FittedPredictor:
    """A model fitted on all the data, with the cross-validated taus that chose it."""

    name: str                                   # the model that predicts: rbf, gp or cart
    model: Predictor
    kendall_tau: dict[str, float] = field(default_factory=dict)       # mean per-fold tau per model tried
    kendall_tau_std: dict[str, float] = field(default_factory=dict)   # std of the per-fold taus
    score: dict[str, float] = field(default_factory=dict)             # mean - std: what the choice maximises

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.model.predict(X)


@_one_blas_thread
def fit_predictor(kind: str, X: np.ndarray, y: np.ndarray, *, seed: int = 0, folds: int = 10,
                  pool: Sequence[str] = PREDICTORS, cart_trees: int = 100) -> FittedPredictor:
    """Fit ``kind`` (one of :data:`CHOICES`) on ``(X, y)``.

    For ``adaptive`` every model of ``pool`` is cross-validated and the one with the largest
    ``mean - std`` of its per-fold Kendall tau is refitted on all the data. For a single model
    its own cross-validated tau is reported as well (same folds). Needs at least
    :data:`MIN_POINTS` points.
    """
    if kind not in CHOICES:
        raise ValueError(f"kind must be one of {', '.join(CHOICES)}, got {kind!r}")
    pool = tuple(pool)
    if not pool or any(name not in PREDICTORS for name in pool) or len(set(pool)) != len(pool):
        raise ValueError(f"pool must list distinct models out of {', '.join(PREDICTORS)}, got {pool!r}")
    X, y = _check_xy(X, y)
    _check_folds(folds, len(X))
    tried = pool if kind == "adaptive" else (kind,)
    means, stds, scores = {}, {}, {}
    for name in tried:
        taus = cross_validated_tau(name, X, y, folds=folds, seed=seed, cart_trees=cart_trees)
        valid = taus[np.isfinite(taus)]
        means[name] = float(valid.mean()) if valid.size else float("nan")
        stds[name] = float(valid.std()) if valid.size else float("nan")
        scores[name] = means[name] - stds[name]
    ranked = [name for name in tried if np.isfinite(scores[name])]
    winner = max(ranked, key=lambda name: scores[name]) if ranked else tried[0]   # max keeps the first of ties
    log.info("accuracy predictor %s (kendall tau mean-std: %s)", winner,
             ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    model = make_predictor(winner, seed=seed, cart_trees=cart_trees).fit(X, y)
    return FittedPredictor(name=winner, model=model, kendall_tau=means, kendall_tau_std=stds, score=scores)
