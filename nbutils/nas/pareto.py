"""Pareto fronts and the choice of architectures in NSGANetV2's search: the non-dominated set,
the reference's high trade-off points and the architecture the papers retrain, and the
candidates NSGA-II proposes for measuring (:mod:`nbutils.nas.nsganetv2` says where each is used)."""
from __future__ import annotations

from typing import Callable, Protocol

import lazy_loader
import numpy as np

from ..space import encoding
from ..space.genotype import Genotype
from .accuracy_predictors import FittedPredictor

# imported on first use (lazy_loader): SciPy's spatial module and pymoo's NSGA-II take ~0.4 s to
# import, and every notebook imports this module (the registry imports NSGANetV2)
scipy = lazy_loader.load("scipy")
pymoo_nsga2 = lazy_loader.load("pymoo.algorithms.moo.nsga2", suppress_warning=True)
pymoo_problem = lazy_loader.load("pymoo.core.problem", suppress_warning=True)
pymoo_crossover = lazy_loader.load("pymoo.operators.crossover.pntx", suppress_warning=True)
pymoo_mutation = lazy_loader.load("pymoo.operators.mutation.pm", suppress_warning=True)
pymoo_repair = lazy_loader.load("pymoo.operators.repair.rounding", suppress_warning=True)
pymoo_optimize = lazy_loader.load("pymoo.optimize", suppress_warning=True)

#: how the candidates to measure are chosen from NSGA-II's final population (see :func:`propose_candidates`)
SELECTIONS: tuple[str, ...] = ("rank", "spread")


class NsgaSettings(Protocol):
    """What :func:`propose_candidates` reads of a search's config
    (:class:`~nbutils.nas.nsganetv2.Nsganetv2Config` has these fields and more)."""

    population: int
    generations: int
    crossover_prob: float
    mutation_eta: float
    candidate_selection: str


def non_dominated(objectives: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the rows of ``objectives`` (n x m, minimised) that no other row
    dominates (at most as large everywhere and smaller somewhere)."""
    F = np.asarray(objectives, dtype=np.float64)
    if F.ndim != 2 or len(F) == 0:
        raise ValueError(f"objectives must be a non-empty n x m array, got shape {F.shape}")
    dominated = np.zeros(len(F), dtype=bool)
    for i in range(len(F)):
        no_worse = np.all(F <= F[i], axis=1)
        better = np.any(F < F[i], axis=1)
        dominated[i] = bool(np.any(no_worse & better))
    return np.flatnonzero(~dominated)


def high_tradeoff_points(front: np.ndarray, count: int, epsilon: float = 0.125) -> np.ndarray:
    """Indices of the ``count`` points of a non-dominated set with the highest trade-off.

    The reference's ``HighTradeoffPoints`` (``post_search.py``, after pymoo's decision making):
    objectives normalised to [0, 1] over the set; for each point, its neighbours within
    ``epsilon`` (at least ``min(2m, n-1)`` nearest ones); the trade-off of a point is the least,
    over its neighbours, of (what moving there loses) / (what it gains), both summed over
    objectives. A high trade-off is a knee: leaving it costs much for little. Returned in
    decreasing trade-off; all points when there are at most ``count``.
    """
    F = np.asarray(front, dtype=np.float64)
    n, m = F.shape
    if count >= n:
        return np.arange(n)
    span = F.max(axis=0) - F.min(axis=0)
    F = (F - F.min(axis=0)) / np.where(span > 0, span, 1.0)
    tree = scipy.spatial.cKDTree(F)
    least = min(2 * m, n - 1)
    trade_off = np.full(n, -np.inf)
    for i in range(n):
        neighbours = tree.query_ball_point(F[i], epsilon)
        if len(neighbours) < least:
            neighbours = list(tree.query(F[i], k=least + 1)[1])
        diff = F[neighbours] - F[i]
        sacrifice, gain = np.maximum(0, diff).sum(axis=1), np.maximum(0, -diff).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = sacrifice / gain
        ratios = ratios[~np.isnan(ratios)]   # the point itself and exact duplicates
        if ratios.size:
            trade_off[i] = ratios.min()
    return np.argsort(-trade_off, kind="stable")[:count]


def choose_retrained(errors: np.ndarray, costs: np.ndarray, front: np.ndarray, tradeoff_points: int = 3
                     ) -> tuple[list[int], int]:
    """The "four best" of a front and the one retrained (see the module docstring).

    ``front`` indexes ``errors``/``costs``. Returns the chosen indices sorted by decreasing
    cost (ties: lower error first) and the retrained one: the third of them, or the last when
    there are fewer than three.
    """
    front = np.asarray(front)
    F = np.column_stack([np.asarray(errors, dtype=float)[front], np.asarray(costs, dtype=float)[front]])
    picked = set(int(front[i]) for i in high_tradeoff_points(F, tradeoff_points))
    most_accurate = min(front.tolist(), key=lambda i: (errors[i], costs[i]))
    picked.add(int(most_accurate))
    best = sorted(picked, key=lambda i: (-costs[i], errors[i], i))
    return best, best[min(2, len(best) - 1)]


# --------------------------------------------------------------------------- candidate proposal


def spread_after(front_costs: np.ndarray, chosen: list[float]) -> float:
    """The reference's subset-selection objective: std of the gaps between sorted costs."""
    values = np.sort(np.concatenate([front_costs, np.asarray(chosen, dtype=float)]))
    return float(np.std(np.diff(values))) if len(values) > 1 else 0.0


def select_candidates(predicted: np.ndarray, front_costs: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` rows of ``predicted`` (n x 2: predicted error, cost) to measure next.

    Whole non-domination ranks first; the rank that does not fit whole is thinned greedily,
    each step adding the row that keeps the gaps between the sorted costs of ``front_costs``
    plus the chosen rows most even (ties: lower predicted error, then lower index).
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    remaining = list(range(len(predicted)))
    chosen: list[int] = []
    while remaining and len(chosen) < count:
        rank = [remaining[i] for i in non_dominated(predicted[remaining])]
        if len(chosen) + len(rank) <= count:
            chosen += rank
            remaining = [i for i in remaining if i not in rank]
            continue
        while len(chosen) < count:
            chosen_costs = [predicted[i, 1] for i in chosen]
            best = min(rank, key=lambda i: (spread_after(front_costs, chosen_costs + [predicted[i, 1]]),
                                            predicted[i, 0], i))
            chosen.append(best)
            rank.remove(best)
    return chosen


def select_by_spread(costs: np.ndarray, front_costs: np.ndarray, count: int) -> list[int]:
    """The reference's subset selection: the ``count`` entries of ``costs`` (all of them when
    there are no more) that, with ``front_costs``, leave the most even gaps, i.e. minimise the
    standard deviation of the gaps between the sorted costs (:func:`spread_after`). Predicted
    errors play no part. Returns the chosen indices in ascending order (the reference's boolean
    mask read in order).

    The reference searches the subsets with a genetic algorithm (population 100, 60
    generations, a penalty unless exactly ``count`` are chosen), a heuristic; here the minimum
    is exact. Once the first and the last of the sorted costs kept are fixed, the number of
    gaps ``m`` and their sum (last - first) are fixed, so the variance
    ``sum(g^2) / m - (sum(g) / m)^2`` is least when the sum of the squared gaps is: a shortest
    path through the sorted costs that passes every front cost and exactly ``count`` of the
    others, found by dynamic programming for each possible first cost (a front cost cannot be
    skipped, so the first is at or before the lowest front cost, the last at or after the
    highest). Ties: the first start, then the first path found, in sorted order.
    """
    costs = np.asarray(costs, dtype=np.float64).reshape(-1)
    front_costs = np.asarray(front_costs, dtype=np.float64).reshape(-1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    if not (np.all(np.isfinite(costs)) and np.all(np.isfinite(front_costs))):
        raise ValueError("costs and front_costs must be finite")
    n, f = len(costs), len(front_costs)
    if count >= n:
        return list(range(n))
    if count == 0:
        return []
    gaps = f + count - 1
    if gaps == 0:
        return [0]   # one cost alone: no gaps, every choice alike
    values = np.concatenate([front_costs, costs])
    order = np.lexsort((np.arange(f + n), values))
    x, forced = values[order], order < f
    size = len(x)
    forced_at = np.flatnonzero(forced)
    lowest_forced = int(forced_at[0]) if f else size - 1
    highest_forced = int(forced_at[-1]) if f else 0
    # the next front cost after each position: a path may not step over it
    next_forced = np.full(size, size - 1)
    for i in range(size - 2, -1, -1):
        next_forced[i] = i + 1 if forced[i + 1] else next_forced[i + 1]
    best_value, best_path = np.inf, None
    for first in range(lowest_forced + 1):
        squared, previous = _least_squared_gaps(x, forced, next_forced, first, count)
        for last in range(max(first, highest_forced), size):
            if np.isfinite(squared[last, count]):
                variance = squared[last, count] / gaps - ((x[last] - x[first]) / gaps) ** 2
                if variance < best_value:
                    best_value, best_path = variance, (first, last, previous)
    first, last, previous = best_path
    return sorted(int(order[j]) - f for j in _path(previous, forced, first, last, count) if not forced[j])


def _least_squared_gaps(x: np.ndarray, forced: np.ndarray, next_forced: np.ndarray, first: int,
                        count: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`select_by_spread`'s dynamic programme for the paths from ``first`` through the sorted
    costs ``x``: ``squared[j, k]``, the least sum of squared gaps of a path from ``first`` to ``j``
    with ``k`` costs chosen (inf: none), and ``previous[j, k]``, the position before ``j`` on it.
    A path passes every ``forced`` position (a front cost) and steps over none (``next_forced``)."""
    size = len(x)
    squared = np.full((size, count + 1), np.inf)
    previous = np.full((size, count + 1), -1, dtype=np.int64)
    squared[first, 0 if forced[first] else 1] = 0.0
    for i in range(first, size - 1):
        if not np.isfinite(squared[i]).any():
            continue
        js = np.arange(i + 1, next_forced[i] + 1)
        step = (x[js] - x[i])[:, None] ** 2
        reached = np.full((len(js), count + 1), np.inf)
        reached[forced[js]] = squared[i] + step[forced[js]]
        reached[~forced[js], 1:] = squared[i, :-1] + step[~forced[js]]
        better = reached < squared[js]
        squared[js] = np.where(better, reached, squared[js])
        previous[js] = np.where(better, i, previous[js])
    return squared, previous


def _path(previous: np.ndarray, forced: np.ndarray, first: int, last: int, count: int) -> list[int]:
    """The positions of the path :func:`_least_squared_gaps` found from ``first`` to ``last`` with
    ``count`` costs chosen, read back from ``last``."""
    path, j, k = [], last, count
    while True:
        path.append(j)
        if j == first:
            return path
        j, k = int(previous[j, k]), k - (0 if forced[j] else 1)


def propose_candidates(
    archive: np.ndarray,
    objectives: np.ndarray,
    predictor: FittedPredictor,
    cost: Callable[[Genotype], float],
    count: int,
    config: NsgaSettings,
    *,
    seed: int,
) -> np.ndarray:
    """NSGA-II on (predicted error, cost) from the archive's non-dominated set; returns up to
    ``count`` encodings (rows) not in ``archive``, chosen by :func:`select_candidates`
    (``config.candidate_selection == "rank"``) or :func:`select_by_spread` (``"spread"``)."""
    upper = encoding.upper_bounds()
    cost_cache: dict[tuple[int, ...], float] = {}

    def vector_cost(vector: np.ndarray) -> float:
        k = encoding.key(vector)
        if k not in cost_cache:
            cost_cache[k] = cost(encoding.decode(vector))
        return cost_cache[k]

    class SurrogateProblem(pymoo_problem.Problem):
        def __init__(self) -> None:
            super().__init__(n_var=encoding.ENCODING_LENGTH, n_obj=2, xl=np.zeros_like(upper), xu=upper, vtype=int)

        def _evaluate(self, X, out, *args, **kwargs):
            X = np.round(X).astype(np.int64)
            out["F"] = np.column_stack([predictor.predict(X / upper), [vector_cost(x) for x in X]])

    front = non_dominated(objectives)
    algorithm = pymoo_nsga2.NSGA2(
        pop_size=config.population,
        sampling=archive[front].astype(np.int64),
        crossover=pymoo_crossover.TwoPointCrossover(prob=config.crossover_prob),
        mutation=pymoo_mutation.PM(prob=1.0, eta=config.mutation_eta, vtype=float, repair=pymoo_repair.RoundingRepair()),
        eliminate_duplicates=True,
    )
    result = pymoo_optimize.minimize(SurrogateProblem(), algorithm, ("n_gen", config.generations), seed=seed, verbose=False)
    X = np.round(result.pop.get("X")).astype(np.int64)
    F = result.pop.get("F")
    fresh = _new_rows(X, archive)
    if config.candidate_selection == "spread":
        picked = select_by_spread(F[fresh, 1], objectives[front, 1], count)
    else:
        picked = select_candidates(F[fresh], objectives[front, 1], count)
    return X[[fresh[i] for i in picked]].reshape(-1, encoding.ENCODING_LENGTH)


def _new_rows(X: np.ndarray, archive: np.ndarray) -> list[int]:
    """The indices of the encodings of ``X`` that are not in ``archive``, the first of repeats only."""
    seen = {encoding.key(x) for x in archive}
    fresh = []
    for i, x in enumerate(X):
        k = encoding.key(x)
        if k not in seen:
            seen.add(k)
            fresh.append(i)
    return fresh


