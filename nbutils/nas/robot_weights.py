"""RoBoT's search over the weights of its training-free metrics, steps 3 to 5 of
:mod:`nbutils.nas.robot`: Bayesian optimisation of the weights (a query's objective is the
validation accuracy of the pool architecture its weighted score ranks first), exploitation of
the best weights, and selection of the best trained architecture.

Independent of networks and data: the pool is its matrix of normalised metrics, and training an
architecture is the ``evaluate(pool_index)`` callable :func:`optimise_weights` is given.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import lazy_loader
import numpy as np
from threadpoolctl import threadpool_limits   # a dependency of scikit-learn

from ..core.progress import progress
from .zero_cost import METRICS

#: imported on first use (lazy_loader): bayes_opt loads scikit-learn and SciPy, ~1.5 s, and every
#: notebook imports this module (through the registry)
bayes_opt = lazy_loader.load("bayes_opt")

log = logging.getLogger(__name__)


def rank_pool(normalised: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pool indices of the defined rows by decreasing weighted score ``normalised @ weights``
    (ties: lower index first); rows with NaN are left out."""
    normalised = np.asarray(normalised, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if normalised.ndim != 2 or weights.shape != (normalised.shape[1],):
        raise ValueError(f"weights must have one value per metric ({normalised.shape[1]}), got shape {weights.shape}")
    defined = np.flatnonzero(np.isfinite(normalised).all(axis=1))
    scores = normalised[defined] @ weights
    return defined[np.lexsort((defined, -scores))]


# --------------------------------------------------------------------------- BO and exploitation


@dataclass
class RobotTrace:
    """What :func:`optimise_weights` did.

    ``queries``: one record per BO query (``query`` from 1, ``weights`` {metric: w},
    ``pool_index`` of its top architecture, ``objective``, ``cached`` if that architecture had
    been trained before). ``trained``: one record per trained architecture, in training order
    (``pool_index``, ``kind`` "bo" or "exploit", ``query`` or None, ``weights`` that ranked it
    top/next, ``score`` under them, ``val_acc``). ``best_weights``: the weights exploited.
    ``best_index``: pool index of the selected (trained) architecture."""

    queries: list[dict] = field(default_factory=list)
    trained: list[dict] = field(default_factory=list)
    best_weights: np.ndarray | None = None
    best_index: int = -1


def optimise_weights(
    normalised: np.ndarray,
    evaluate: Callable[[int], float],
    *,
    init_points: int,
    iterations: int,
    budget: int,
    seed: int,
    kappa: float = 2.576,
    metric_names: Sequence[str] = METRICS,
) -> RobotTrace:
    """RoBoT's search over metric weights (steps 3-5 of the module docstring).

    ``normalised`` is the pool's ``architectures x metrics`` matrix (NaN rows are never
    chosen); ``evaluate(pool_index)`` trains that architecture and returns its validation
    accuracy; it is called at most once per architecture, and exactly ``budget`` times when
    the pool holds that many defined architectures.
    """
    names = list(metric_names)
    normalised = _checked_bo_arguments(normalised, init_points=init_points, iterations=iterations, budget=budget,
                                       names=names)
    trainings = _Trainings(evaluate, normalised, names)
    best_weights = _bayesian_optimisation(normalised, trainings, init_points=init_points, iterations=iterations,
                                          seed=seed, kappa=kappa, names=names)
    _exploit(normalised, trainings, best_weights, budget)
    trace = trainings.trace
    best = max(trace.trained, key=lambda row: row["val_acc"])   # 5. selection: first among equals
    trace.best_weights = best_weights
    trace.best_index = best["pool_index"]
    return trace


def _checked_bo_arguments(normalised: np.ndarray, *, init_points: int, iterations: int, budget: int,
                          names: list[str]) -> np.ndarray:
    """Set-up (before step 3): the arguments of :func:`optimise_weights` checked; ``normalised`` as float64."""
    for name, value, minimum in (("init_points", init_points, 0), ("iterations", iterations, 0), ("budget", budget, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if init_points + iterations < 1:
        raise ValueError(f"init_points + iterations must be at least 1 (one BO query), got {init_points} + {iterations}")
    if init_points + iterations > budget:
        raise ValueError(f"budget ({budget}) must be at least init_points + iterations ({init_points} + {iterations})")
    normalised = np.asarray(normalised, dtype=np.float64)
    if normalised.ndim != 2 or normalised.shape[1] != len(names):
        raise ValueError(f"normalised must be architectures x {len(names)} metrics, got shape {normalised.shape}")
    if not np.isfinite(normalised).all(axis=1).any():
        raise ValueError("normalised has no architecture whose metrics are all defined")
    return normalised


class _Trainings:
    """Steps 3 and 4: the architectures trained so far (each once), their accuracies, and the trace."""

    def __init__(self, evaluate: Callable[[int], float], normalised: np.ndarray, names: list[str]):
        self.evaluate, self.normalised, self.names = evaluate, normalised, names
        self.trace = RobotTrace()
        self.accuracy: dict[int, float] = {}

    def train(self, index: int, kind: str, query: int | None, weights: np.ndarray) -> float:
        value = float(self.evaluate(int(index)))
        if not math.isfinite(value):
            raise RuntimeError(f"evaluate({index}) returned a validation accuracy that is not a number: {value}")
        self.accuracy[int(index)] = value
        self.trace.trained.append({
            "pool_index": int(index), "kind": kind, "query": query,
            "weights": dict(zip(self.names, map(float, weights))),
            "score": float(self.normalised[index] @ weights), "val_acc": value,
        })
        return value


def _bayesian_optimisation(normalised: np.ndarray, trainings: _Trainings, *, init_points: int, iterations: int,
                           seed: int, kappa: float, names: list[str]) -> np.ndarray | None:
    """Step 3: BO over the metric weights, a query's objective its top architecture's accuracy; the best weights."""
    optimizer = bayes_opt.BayesianOptimization(
        f=None, pbounds={name: (-1.0, 1.0) for name in names},
        acquisition_function=bayes_opt.acquisition.UpperConfidenceBound(kappa=kappa),
        random_state=int(seed) % 2**32, verbose=0,
    )
    best_objective, best_weights = -math.inf, None
    queries = init_points + iterations
    for q in progress(range(queries), desc="RoBoT: Bayesian optimisation"):
        # The GP holds at most init_points + iterations points: extra BLAS threads only add
        # overhead (2-3x the wall time on a busy 2-core machine). Its fit may warn on few points.
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore")
            params = optimizer.random_sample(1)[0] if q < init_points else optimizer.suggest()
        weights = np.array([float(params[name]) for name in names])
        top = int(rank_pool(normalised, weights)[0])
        cached = top in trainings.accuracy
        objective = trainings.accuracy[top] if cached else trainings.train(top, "bo", q + 1, weights)
        try:
            optimizer.register(params=params, target=objective)
        except bayes_opt.exception.NotUniqueError:   # the same weights again: nothing new for the GP (as the reference)
            log.info("query %d repeats earlier weights", q + 1)
        if objective >= best_objective:
            best_objective, best_weights = objective, weights
        trainings.trace.queries.append({"query": q + 1, "weights": dict(zip(names, map(float, weights))),
                                        "pool_index": top, "objective": objective, "cached": cached})
        log.info("query %d: architecture %d, val acc %.4f%s", q + 1, top, objective, " (cached)" if cached else "")
    return best_weights


def _exploit(normalised: np.ndarray, trainings: _Trainings, best_weights: np.ndarray, budget: int) -> None:
    """Step 4: the next-ranked untrained architectures under the best weights, trained until the budget is spent."""
    ranking = iter(rank_pool(normalised, best_weights))
    for _ in progress(range(budget - len(trainings.accuracy)), desc="RoBoT: exploitation"):
        index = next((int(i) for i in ranking if int(i) not in trainings.accuracy), None)
        if index is None:
            log.warning("exploitation: the pool has no untrained architecture left (%d trained, budget %d)",
                        len(trainings.accuracy), budget)
            break
        trainings.train(index, "exploit", None, best_weights)
