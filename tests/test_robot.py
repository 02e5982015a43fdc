"""Tests for RoBoT (nbutils.nas.robot): the pool, min-max normalisation, the ranking, the BO +
exploitation loop (budget, cache, selection of a trained architecture) and a tiny end-to-end
search."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from nbutils.core.image_dataset import ImageDataset
from nbutils.space.genotype import Genotype
from nbutils.space.ops import PRIMITIVES
from nbutils.nas.robot import RobotConfig, normalise_pool, robot_search, sample_pool
from nbutils.nas.robot_weights import optimise_weights, rank_pool

from toys import toy


def toy_dataset(n: int, seed: int, classes: int = 3, size: int = 8) -> ImageDataset:
    return toy(n, seed=seed, num_classes=classes, size=size, random_labels=True)


def tiny_config(**overrides) -> RobotConfig:
    settings = dict(pool_size=12, init_points=1, iterations=1, budget=3, train_epochs=1, train_batch_size=20,
                    channels=2, layers=3, metric_batch_size=8)
    settings.update(overrides)
    return RobotConfig(**settings)


def operations(genotype: Genotype) -> set[str]:
    return {op for op, _ in genotype.normal + genotype.reduce}


# --------------------------------------------------------------------------- pure parts


def test_normalise_pool_is_min_max_over_the_defined_architectures():
    values = np.array([
        [1.0, 5.0, 2.0],
        [3.0, 5.0, 0.0],
        [np.nan, 9.0, 9.0],    # undefined metric: skipped, and not part of the min / max
        [2.0, 5.0, 4.0],
        [100.0, np.inf, 1.0],  # not finite: skipped too
    ])
    normalised, defined = normalise_pool(values)
    assert defined.tolist() == [True, True, False, True, False]
    expected = np.array([[0.0, 0.0, 0.5], [1.0, 0.0, 0.0], [0.5, 0.0, 1.0]])   # column 1 is constant -> 0
    np.testing.assert_allclose(normalised[defined], expected, rtol=0, atol=1e-15)
    assert np.isnan(normalised[~defined]).all()


def test_rank_pool_orders_by_weighted_score_ties_to_the_lower_index_and_skips_undefined():
    normalised = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [np.nan, 1.0], [1.0, 0.0]])
    # scores 0.5, 1.0, 0.75, -, 1.0
    assert rank_pool(normalised, np.array([1.0, 0.5])).tolist() == [1, 4, 2, 0]
    # scores 0, -1, -0.5, -, -1
    assert rank_pool(normalised, np.array([-1.0, 0.0])).tolist() == [0, 2, 1, 4]
    with pytest.raises(ValueError, match="weights"):
        rank_pool(normalised, np.array([1.0, 0.0, 0.0]))


def test_sample_pool_is_distinct_seeded_and_uses_every_operation_including_dil_conv_5x5():
    pool = sample_pool(12, seed=3)
    assert len(set(pool)) == 12
    assert any("dil_conv_5x5" in operations(g) for g in pool)
    assert set().union(*map(operations, pool)) == {p for p in PRIMITIVES if p != "none"}
    assert sample_pool(12, seed=3) == pool
    assert sample_pool(12, seed=4) != pool


# --------------------------------------------------------------------------- BO and exploitation


def test_optimise_weights_trains_budget_distinct_architectures_each_once_and_exploits_the_best_weights():
    rng = np.random.default_rng(0)
    normalised = rng.random((30, 6))
    accuracy = rng.random(30)
    calls: list[int] = []

    def evaluate(index: int) -> float:
        calls.append(index)
        return float(accuracy[index])

    trace = optimise_weights(normalised, evaluate, init_points=1, iterations=3, budget=7, seed=0)

    assert len(calls) == 7 and len(set(calls)) == 7             # the budget, never one trained twice
    assert [row["pool_index"] for row in trace.trained] == calls
    assert len(trace.queries) == 4
    for query in trace.queries:                                 # each query's objective is its top architecture's
        weights = np.array(list(query["weights"].values()))
        assert np.all(np.abs(weights) <= 1.0)
        assert query["pool_index"] == rank_pool(normalised, weights)[0]
        assert query["objective"] == accuracy[query["pool_index"]]
    bo = [row["pool_index"] for row in trace.trained if row["kind"] == "bo"]
    assert bo == list(dict.fromkeys(q["pool_index"] for q in trace.queries))
    assert [q["cached"] for q in trace.queries] == [q["pool_index"] in [q2["pool_index"] for q2 in trace.queries[:k]]
                                                   for k, q in enumerate(trace.queries)]

    # the best weights: the query with the highest objective (the latest among equals)
    objectives = [q["objective"] for q in trace.queries]
    best_query = max(k for k, v in enumerate(objectives) if v == max(objectives))
    np.testing.assert_array_equal(trace.best_weights, list(trace.queries[best_query]["weights"].values()))
    # exploitation: the next-ranked untrained architectures under them, in rank order, up to the budget
    exploit = [row["pool_index"] for row in trace.trained if row["kind"] == "exploit"]
    expected = [int(i) for i in rank_pool(normalised, trace.best_weights) if i not in bo][: 7 - len(bo)]
    assert exploit == expected
    # the result: the best trained architecture
    assert trace.best_index == max(calls, key=lambda i: accuracy[i])


def test_optimise_weights_stops_when_the_defined_pool_is_exhausted():
    normalised = np.array([[0.1, 0.2], [np.nan, 0.5], [0.9, 0.3], [0.4, np.nan], [0.6, 0.7]])
    calls: list[int] = []
    trace = optimise_weights(normalised, lambda i: calls.append(i) or 0.5, init_points=1, iterations=1, budget=5,
                             seed=0, metric_names=("a", "b"))
    assert sorted(calls) == [0, 2, 4]
    assert trace.best_index in calls


def test_optimise_weights_needs_a_query_and_a_budget():
    normalised = np.zeros((3, 6))
    with pytest.raises(ValueError, match="init_points \\+ iterations"):
        optimise_weights(normalised, lambda i: 0.0, init_points=0, iterations=0, budget=2, seed=0)
    with pytest.raises(ValueError, match="budget"):
        optimise_weights(normalised, lambda i: 0.0, init_points=1, iterations=0, budget=0, seed=0)


def reference_selection(trained: list[dict]) -> int:
    """The reference's final choice (``darts_space/search.py``), restated: start from
    ``min(val_accs) - 1`` where ``val_accs`` is keyed by pool index, and from architecture 0;
    take each trained architecture whose accuracy beats the running best."""
    val_accs = {row["pool_index"]: row["val_acc"] for row in trained}
    best_acc, best_arch = min(val_accs) - 1, 0
    for arch, acc in val_accs.items():
        if acc > best_acc:
            best_acc, best_arch = acc, arch
    return best_arch


def test_the_best_trained_architecture_is_returned_where_the_reference_returns_an_untrained_one():
    # Row 0 scores 0.5 * sum(w): the binary row 1[w > 0] always beats it, and exactly one of
    # each complementary pair of binary rows does, so row 0 ranks below 32 rows under any
    # weights: with a budget of 6 it is never trained.
    binary = np.array(list(itertools.product([0.0, 1.0], repeat=6)))
    normalised = np.vstack([np.full(6, 0.5), binary])
    accuracy = 0.001 * (np.arange(len(normalised)) % 7)   # low accuracies, as in a hard task
    trace = optimise_weights(normalised, lambda i: float(accuracy[i]), init_points=1, iterations=3, budget=6, seed=1)

    trained = [row["pool_index"] for row in trace.trained]
    assert 0 not in trained and len(trained) == 6
    assert reference_selection(trace.trained) == 0            # the reference's defect: untrained architecture 0
    assert trace.best_index in trained
    assert accuracy[trace.best_index] == max(accuracy[trained])


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("field, value", [
    ("pool_size", 0), ("budget", 0), ("iterations", -1), ("layers", 2), ("metric_batch_size", 1),
    ("lr", 0.0), ("lr_min", 0.2), ("drop_path", 1.0), ("train_epochs", 1.5), ("kappa", -1.0),
    ("metrics", ("grad_norm", "nope")), ("init_points", True),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"RobotConfig.{field}"):
        RobotConfig(**{field: value})


def test_config_budget_must_cover_the_queries_and_fit_the_pool():
    with pytest.raises(ValueError, match="RobotConfig.budget"):
        RobotConfig(init_points=1, iterations=24, budget=20)
    with pytest.raises(ValueError, match="RobotConfig.budget"):
        RobotConfig(pool_size=10, iterations=2, budget=11)


def test_robot_search_checks_the_data_before_any_compute():
    with pytest.raises(ValueError, match="metric_batch_size"):
        robot_search(toy_dataset(5, 0), toy_dataset(5, 1), tiny_config(), seed=0, device="cpu")
    with pytest.raises(ValueError, match="share classes"):
        robot_search(toy_dataset(40, 0), toy_dataset(40, 1, classes=4), tiny_config(), seed=0, device="cpu")


# --------------------------------------------------------------------------- end to end


def test_robot_search_on_a_tiny_pool_returns_its_best_trained_architecture():
    config = tiny_config()
    result = robot_search(toy_dataset(40, 0), toy_dataset(40, 1), config, seed=5, device="cpu")
    pool = sample_pool(config.pool_size, seed=5)
    assert any("dil_conv_5x5" in operations(g) for g in pool)

    history = result.history
    assert len(history) == config.budget
    assert len({row["pool_index"] for row in history}) == config.budget
    assert history[0]["kind"] == "bo"
    for row in history:
        assert row["genotype"] == pool[row["pool_index"]].to_dict()
        assert 0.0 <= row["val_acc"] <= 1.0
    best = max(history, key=lambda row: row["val_acc"])
    assert result.genotype == pool[best["pool_index"]]

    values, normalised = result.arrays["pool_metrics"], result.arrays["pool_normalised"]
    assert values.shape == (12, 6)
    np.testing.assert_array_equal(normalised, normalise_pool(values)[0])
    assert result.stages[0]["scored"] + result.stages[0]["skipped"] == 12
    for query, weights in zip(result.stages[1]["queries"], result.arrays["query_weights"]):
        assert query["pool_index"] == rank_pool(normalised, weights)[0]


def test_robot_search_is_deterministic_by_seed():
    config = tiny_config(pool_size=4, metrics=("grad_norm", "snip", "synflow"))
    data = toy_dataset(40, 0), toy_dataset(40, 1)

    def run(seed: int):
        found = robot_search(*data, config, seed=seed, device="cpu")
        rows = [{k: v for k, v in row.items() if k != "seconds"} for row in found.history]
        return found, rows

    first, first_rows = run(7)
    again, again_rows = run(7)
    assert again_rows == first_rows
    assert again.genotype == first.genotype
    for name, array in first.arrays.items():
        np.testing.assert_array_equal(again.arrays[name], array)
    other, _ = run(8)
    assert not np.array_equal(other.arrays["pool_metrics"], first.arrays["pool_metrics"])
