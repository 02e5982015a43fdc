"""Tests for NSGANetV2 on the DARTS space: accuracy predictors, the one-shot supernet, the cost
objective, Pareto-front helpers and a tiny end-to-end search."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from nbutils.space import encoding
from nbutils.nas.accuracy_predictors import (
    FittedPredictor,
    RbfPredictor,
    cross_validated_tau,
    fit_predictor,
    kendall_tau,
)
from nbutils.nas.search_result import SearchResult
from nbutils.space.genotype import Genotype, published, random_genotype
from nbutils.space.network import EvalNetwork, count_parameters
from nbutils.nas.architecture_cost import ArchitectureCost, count_macs
from nbutils.nas.nsganetv2 import Nsganetv2Config, nsganetv2_search
from nbutils.report.charts import pareto_figure
from nbutils.nas.pareto import (choose_retrained, high_tradeoff_points, non_dominated, propose_candidates,
                                select_candidates)
from nbutils.core.batches import BatchLoader
from nbutils.nas.one_shot import OneShotSupernet, PathEvaluator, recalibrate_batch_norm, train_one_shot
from nbutils.training.recipe import TrainingRecipe

from toys import tiny_nsganetv2_config as tiny_config, toy

CPU = torch.device("cpu")


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


# --------------------------------------------------------------------------- accuracy predictors


def test_adaptive_choice_picks_trees_on_a_step_target():
    """y is a step in a coordinate taking the values 0, 1, 2 (each present in every training
    fold): every bagged CART splits at 0.5 and ranks every held-out fold perfectly (tau 1,
    std 0); smooth interpolants, distracted by three irrelevant coordinates, cannot. CART is
    listed last, so it wins on its score, not on a tie."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 10, size=(40, 4)).astype(float)
    X[:, 0] = rng.integers(0, 3, size=40)
    y = (X[:, 0] >= 1).astype(float)
    fitted = fit_predictor("adaptive", X, y, seed=1, folds=4, pool=("rbf", "gp", "cart"), cart_trees=20)
    assert fitted.name == "cart"
    assert fitted.kendall_tau["cart"] == pytest.approx(1.0)
    assert fitted.kendall_tau["rbf"] < 0.95 and fitted.kendall_tau["gp"] < 0.95
    assert fitted.score["cart"] == max(fitted.score.values())
    assert np.array_equal(fitted.predict(X), y)   # the refit on all data is the exact step


def test_adaptive_choice_picks_rbf_on_a_linear_target():
    """A cubic RBF with a linear tail reproduces a linear function exactly (tau 1 on every
    fold); trees cannot. RBF is listed last, so it wins on its score."""
    rng = np.random.default_rng(1)
    X = rng.random((40, 4))
    w = np.array([1.0, -2.0, 0.5, 3.0])
    fitted = fit_predictor("adaptive", X, X @ w, seed=2, folds=4, pool=("cart", "rbf"), cart_trees=20)
    assert fitted.name == "rbf"
    assert fitted.kendall_tau["rbf"] == pytest.approx(1.0)
    assert fitted.kendall_tau["cart"] < 0.95
    X_new = rng.random((10, 4))
    np.testing.assert_allclose(fitted.predict(X_new), X_new @ w, atol=1e-8)


def test_a_single_model_is_cross_validated_on_the_same_folds():
    rng = np.random.default_rng(2)
    X = rng.random((24, 3))
    y = np.sin(3 * X[:, 0]) + X[:, 1]
    fitted = fit_predictor("gp", X, y, seed=5, folds=4)
    assert fitted.name == "gp" and set(fitted.kendall_tau) == {"gp"}
    taus = cross_validated_tau("gp", X, y, folds=4, seed=5)
    assert fitted.kendall_tau["gp"] == pytest.approx(taus.mean())
    assert fitted.kendall_tau_std["gp"] == pytest.approx(taus.std())


def test_rbf_falls_back_to_a_lower_order_when_points_do_not_span_the_space():
    rng = np.random.default_rng(3)
    X, y = rng.random((5, 8)), rng.random(5)       # 5 points cannot fix a linear tail in 8 dimensions
    model = RbfPredictor().fit(X, y)
    assert (model.kernel, model.degree) == ("linear", 0)
    np.testing.assert_allclose(model.predict(X), y, atol=1e-8)   # still interpolates
    X, y = rng.random((12, 3)), rng.random(12)
    assert (RbfPredictor().fit(X, y).kernel, RbfPredictor().fit(X, y).degree) == ("cubic", 1)
    # repeated inputs are merged to their mean target
    model = RbfPredictor().fit(np.vstack([X, X[:1]]), np.append(y, y[0] + 2.0))
    assert model.predict(X[:1])[0] == pytest.approx(y[0] + 1.0)


def test_kendall_tau_edge_cases():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([3, 2, 1], [10, 20, 30]) == pytest.approx(-1.0)
    assert kendall_tau([1, 1, 1], [10, 20, 30]) == 0.0          # a model that ranks nothing
    assert np.isnan(kendall_tau([1, 2, 3], [5, 5, 5]))          # nothing to rank


def test_predictor_arguments_are_checked():
    X, y = np.random.default_rng(0).random((10, 2)), np.arange(10.0)
    with pytest.raises(ValueError, match="kind"):
        fit_predictor("mlp", X, y)
    with pytest.raises(ValueError, match="at least 6"):
        fit_predictor("rbf", X[:5], y[:5])
    with pytest.raises(ValueError, match="pool"):
        fit_predictor("adaptive", X, y, pool=("rbf", "rbf"))


# --------------------------------------------------------------------------- one-shot supernet


def tiny_supernet(seed: int = 0) -> OneShotSupernet:
    torch.manual_seed(seed)
    return OneShotSupernet(channels=4, num_classes=3, layers=3, in_channels=1)


def test_single_path_forward_touches_only_the_chosen_operations():
    supernet = tiny_supernet()
    genotype = random_genotype(np.random.default_rng(0))
    x = torch.randn(4, 1, 8, 8)
    supernet(x, genotype).sum().backward()
    chosen = {"normal": set(), "reduce": set()}
    offsets = [0, 2, 5, 9]
    for cell in chosen:
        gene = getattr(genotype, cell)
        for k, (op, src) in enumerate(gene):
            chosen[cell].add((offsets[k // 2] + src, encoding.OPERATIONS.index(op)))
    for c, cell in enumerate(supernet.net.cells):
        kind = "reduce" if cell.reduction else "normal"
        for e, edge in enumerate(cell.edges):
            for o, op in enumerate(edge.ops):
                grads = [p.grad for p in op.parameters()]
                if not grads:
                    continue   # pools: nothing to learn
                used = (e, o) in chosen[kind]
                assert all((g is not None) == used for g in grads), (c, e, o, used)


def test_recalibration_recomputes_the_statistics_from_the_given_batches():
    supernet = tiny_supernet()
    genotype = random_genotype(np.random.default_rng(1))
    batches = [torch.randn(8, 1, 8, 8) + 2.0 for _ in range(3)]
    stem_bn = supernet.net.stem[1]
    stem_bn.running_mean.fill_(123.0)
    recalibrate_batch_norm(supernet, genotype, batches)
    with torch.no_grad():
        conv_out = torch.cat([supernet.net.stem[0](x) for x in batches])
    torch.testing.assert_close(stem_bn.running_mean, conv_out.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert stem_bn.momentum == 0.1
    assert not any(m.training for module in supernet.path_modules(genotype) for m in module.modules())


def test_path_evaluation_does_not_depend_on_what_was_evaluated_before():
    supernet = tiny_supernet()
    rng = np.random.default_rng(2)
    a, b = random_genotype(rng), random_genotype(rng)
    data = toy(24, seed=3)
    x = data.images.float() / 255.0
    validation = [(x[:12], data.labels[:12]), (x[12:], data.labels[12:])]
    evaluate = PathEvaluator(supernet, [torch.randn(8, 1, 8, 8) for _ in range(2)], validation)
    first = evaluate(a)
    evaluate(b)
    assert evaluate(a) == first
    with torch.no_grad():
        direct = (supernet(x, a).argmax(1) == data.labels).float().mean().item()   # still calibrated for a
    assert direct == pytest.approx(first)


def test_training_is_seeded_and_follows_the_cosine_schedule():
    data = toy(32, seed=4)

    def trained(seed: int) -> tuple[OneShotSupernet, list[dict]]:
        supernet = tiny_supernet(seed=0)
        loader = BatchLoader(data, 16, shuffle=True, seed=0, mean=(0.5,), std=(0.25,))
        return supernet, train_one_shot(supernet, loader, TrainingRecipe(epochs=2, lr=0.1, lr_min=0.0), seed=seed)

    a, history = trained(seed=1)
    b, _ = trained(seed=1)
    c, _ = trained(seed=2)      # other paths drawn
    untrained = tiny_supernet(seed=0)
    assert [row["lr"] for row in history] == pytest.approx([0.1, 0.05])
    state_a, state_b, state_c, state_0 = (m.state_dict() for m in (a, b, c, untrained))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert not torch.equal(state_a["net.stem.0.weight"], state_0["net.stem.0.weight"])


# --------------------------------------------------------------------------- the cost objective


@pytest.mark.parametrize("kind, size", [("params", 8), ("macs", 8), ("macs", 7)])
def test_cost_equals_counting_on_the_built_network(kind, size):
    cost = ArchitectureCost(kind, channels=4, layers=5, num_classes=3, in_channels=1, input_size=size)
    rng = np.random.default_rng(4)
    values = set()
    for _ in range(4):
        genotype = random_genotype(rng)
        network = EvalNetwork(genotype, channels=4, num_classes=3, layers=5, in_channels=1, input_size=size)
        expected = count_parameters(network) if kind == "params" else count_macs(network, torch.zeros(1, 1, size, size))
        assert cost(genotype) == expected
        values.add(expected)
    assert len(values) > 1   # the genotypes differ in cost, so the sum is really per operation


def test_cost_of_darts_v2_at_the_paper_scale():
    assert ArchitectureCost("params")(published("DARTS_V2")) == 3_349_342   # README: equals the reference


# --------------------------------------------------------------------------- fronts and choices


def test_non_dominated_matches_the_definition():
    rng = np.random.default_rng(5)
    F = np.round(rng.random((60, 2)), 1)      # rounding makes ties and duplicates
    front = set(non_dominated(F).tolist())
    for i in range(len(F)):
        dominated = any(dominates(F[j], F[i]) for j in range(len(F)))
        assert (i in front) == (not dominated)


def test_high_tradeoff_point_is_the_knee():
    # error falls steeply up to cost 1, then hardly at all: (1, 0.1) is the knee
    left = [(c, 1.0 - 0.9 * c) for c in np.linspace(0, 1, 6)]
    right = [(c, 0.1 - 0.01 * (c - 1)) for c in np.linspace(1, 10, 10)[1:]]
    front = np.array([(e, c) for c, e in left + right])   # columns: error, cost
    knee = int(np.flatnonzero((front[:, 1] == 1.0))[0])
    assert high_tradeoff_points(front, 1).tolist() == [knee]
    assert sorted(high_tradeoff_points(front[:2], 3).tolist()) == [0, 1]


def test_choose_retrained_takes_the_third_highest_cost_of_the_four():
    errors = np.array([0.10, 0.12, 0.20, 0.30, 0.40, 0.50, 0.60])
    costs = np.array([90.0, 50.0, 40.0, 30.0, 20.0, 10.0, 1.0])
    front = np.arange(7)
    four, chosen = choose_retrained(errors, costs, front, tradeoff_points=3)
    assert 0 in four                                   # the most accurate is always among them
    assert len(four) == 4 and len(set(four)) == 4
    assert list(four) == sorted(four, key=lambda i: -costs[i])
    assert chosen == four[2]
    F = np.column_stack([errors, costs])
    assert set(four) - {0} <= set(high_tradeoff_points(F, 3).tolist())
    # a front of two: both, and the cheaper is retrained
    four, chosen = choose_retrained(errors, costs, np.array([0, 6]))
    assert four == [0, 6] and chosen == 6


def test_select_candidates_takes_whole_ranks_then_evens_out_the_front():
    # rank 0: costs 1, 5, 9 (errors falling); rank 1: dominated rows
    predicted = np.array([[0.5, 1.0], [0.3, 5.0], [0.1, 9.0], [0.6, 2.0], [0.4, 6.0]])
    assert select_candidates(predicted, np.array([0.0, 10.0]), 1) == [1]     # cost 5 splits 0..10 evenly
    assert sorted(select_candidates(predicted, np.array([0.0, 10.0]), 3)) == [0, 1, 2]
    four = select_candidates(predicted, np.array([0.0, 10.0]), 4)
    assert sorted(four[:3]) == [0, 1, 2] and four[3] in (3, 4)
    assert len(select_candidates(predicted, np.array([0.0]), 10)) == 5


class _SumOfVariables:
    """A stand-in predictor: the predicted error is the sum of the (scaled) variables."""

    name = "sum"

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X).sum(axis=1)


def test_propose_candidates_from_a_front_of_one_returns_new_valid_architectures():
    rng = np.random.default_rng(6)
    archive = np.stack([encoding.random_vector(rng) for _ in range(10)])
    cost = ArchitectureCost("params", channels=4, layers=3, num_classes=3, in_channels=1, input_size=8)
    objectives = np.column_stack([rng.random(10), [cost(encoding.decode(v)) for v in archive]])
    objectives[3] = [-1.0, 0.0]     # one architecture dominates all others: NSGA-II starts from it alone
    assert non_dominated(objectives).tolist() == [3]
    config = Nsganetv2Config(population=10, generations=3)
    proposed = propose_candidates(archive, objectives, FittedPredictor("sum", _SumOfVariables()), cost, 4, config,
                                  seed=0)
    assert proposed.shape == (4, encoding.ENCODING_LENGTH) and proposed.dtype == np.int64
    keys = {encoding.key(v) for v in proposed}
    assert len(keys) == 4 and not keys & {encoding.key(v) for v in archive}
    for vector in proposed:
        encoding.decode(vector)     # within the bounds
    again = propose_candidates(archive, objectives, FittedPredictor("sum", _SumOfVariables()), cost, 4, config, seed=0)
    assert np.array_equal(again, proposed)   # seeded


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("predictor", "mlp", "predictor"),
        ("cost", "latency", "cost"),
        ("initial_design", 5, "initial_design"),
        ("channels", 5, "channels"),
        ("candidates_per_iteration", 0, "candidates_per_iteration"),
        ("lr", -1.0, "lr"),
    ],
)
def test_config_refuses_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        Nsganetv2Config(**{field: value})


# --------------------------------------------------------------------------- end to end


def test_tiny_search_end_to_end():
    config = tiny_config()
    start = time.perf_counter()
    result = nsganetv2_search(toy(48, seed=0), toy(48, seed=1), config, seed=0, device=CPU)
    assert time.perf_counter() - start < 30
    assert isinstance(result, SearchResult) and isinstance(result.genotype, Genotype)

    history = result.history
    assert len(history) == config.initial_design + config.iterations * config.candidates_per_iteration
    assert [row["iteration"] for row in history] == [0] * 8 + [1, 1, 2, 2]
    assert all(row["predicted_acc"] is None for row in history[:8])
    assert all(isinstance(row["predicted_acc"], float) for row in history[8:])
    assert all(0.0 <= row["val_acc"] <= 1.0 for row in history)
    genotypes = [Genotype.from_dict(row["genotype"]) for row in history]
    assert len({encoding.key(encoding.encode(g)) for g in genotypes}) == len(genotypes)   # nothing measured twice

    # the archive arrays agree with the history
    arrays = result.arrays
    assert [encoding.decode(v) for v in arrays["archive_encodings"]] == genotypes
    np.testing.assert_allclose(arrays["archive_error"], [1 - row["val_acc"] for row in history])
    cost = ArchitectureCost("params", channels=4, layers=3, num_classes=3, in_channels=1, input_size=8)
    np.testing.assert_allclose(arrays["archive_cost"], [cost(g) for g in genotypes])

    # the front is the non-dominated set of the archive
    stage = result.stages[0]
    F = np.column_stack([arrays["archive_error"], arrays["archive_cost"]])
    front = [p["index"] for p in stage["pareto_front"]]
    assert sorted(front) == sorted(arrays["pareto_indices"].tolist())
    for i in range(len(F)):
        dominated = any(dominates(F[j], F[i]) for j in range(len(F)))
        assert (i in front) == (not dominated)
    assert [p["cost"] for p in stage["pareto_front"]] == sorted(p["cost"] for p in stage["pareto_front"])

    # the retrained architecture is the third-highest cost of the four best on the front
    assert set(stage["four_best"]) <= set(front)
    assert stage["chosen"] == stage["four_best"][min(2, len(stage["four_best"]) - 1)]
    assert result.genotype == genotypes[stage["chosen"]]
    assert stage["surrogate"] in ("rbf", "gp", "cart")
    assert len(stage["iterations"]) == 2 and len(stage["supernet"]) == 1

    figure = pareto_figure(result)
    assert figure.axes and figure.axes[0].get_ylabel().startswith("validation error")
    assert pareto_figure(stage["pareto_front"]).axes


def test_search_without_iterations_returns_the_design_front():
    result = nsganetv2_search(toy(24, seed=2), toy(24, seed=3), tiny_config(initial_design=3, iterations=0),
                              seed=1, device=CPU)
    assert len(result.history) == 3 and result.stages[0]["surrogate"] is None
    # the design starts from the cheapest (pools only) and the most expensive architecture
    assert result.history[0]["cost"] == min(row["cost"] for row in result.history)
    assert result.history[1]["cost"] == max(row["cost"] for row in result.history)


def test_search_refuses_mismatched_halves():
    with pytest.raises(ValueError, match="share classes"):
        nsganetv2_search(toy(24, seed=0), toy(24, seed=1, size=16), tiny_config(), seed=0, device=CPU)
