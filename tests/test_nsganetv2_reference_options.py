"""Tests for the NSGANetV2 options that follow the reference (mikelzc1990/nsganetv2 as the audit
ran it): the multiply-accumulate cost, the reference's subset selection of candidates, its RBF
surrogate, and the fine-tuning of each candidate before it is measured; and that the defaults
keep the results the search gave before these options existed."""
from __future__ import annotations

import copy
import hashlib
import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nbutils.core.batches import BatchLoader
from nbutils.nas.accuracy_predictors import RbfPredictor
from nbutils.nas.architecture_cost import ArchitectureCost, count_macs
from nbutils.nas.nsganetv2 import FinetunedPathEvaluator, Nsganetv2Config, nsganetv2_search
from nbutils.nas.pareto import select_by_spread, select_candidates, spread_after
from nbutils.nas.one_shot import OneShotSupernet
from nbutils.space import encoding
from nbutils.space.genotype import random_genotype
from nbutils.space.network import EvalNetwork

from toys import tiny_nsganetv2_config as tiny_config, toy

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- 1. the cost: multiply-accumulates


def testcount_macs_known_answer():
    """Worked by hand: a 3x3 conv 1->2 on 4x4 (padding 1) gives 2*4*4 outputs of 1*9 products
    (288); a depthwise 3x3 conv with stride 2 gives 2*2*2 outputs of 1*9 (72); a linear 8->3
    (24). Biases, batch norm and activations are not multiply-accumulates of convs/linears."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                          nn.Conv2d(2, 2, 3, stride=2, padding=1, groups=2), nn.Flatten(), nn.Linear(8, 3))
    assert count_macs(model, torch.zeros(1, 1, 4, 4)) == 288 + 72 + 24


@pytest.mark.parametrize("size", [8, 7])
def test_macs_cost_is_half_the_flops_torch_counts(size):
    """torch's FlopCounterMode counts 2 FLOPs per multiply-accumulate of convolutions and matrix
    products: the cost of a genotype is half its count on the built evaluation network."""
    cost = ArchitectureCost("macs", channels=4, layers=5, num_classes=3, in_channels=1, input_size=size)
    rng = np.random.default_rng(7)
    for _ in range(3):
        genotype = random_genotype(rng)
        network = EvalNetwork(genotype, channels=4, num_classes=3, layers=5, auxiliary=False, in_channels=1,
                              input_size=size).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            network(torch.zeros(1, 1, size, size))
        assert cost(genotype) == counter.get_total_flops() / 2


def test_the_retrained_one_is_ranked_by_the_chosen_cost():
    """With cost="macs" the "four best" are ordered, and the third taken, by multiply-accumulates."""
    config = tiny_config(iterations=0, initial_design=6, cost="macs")
    result = nsganetv2_search(toy(24, seed=2), toy(24, seed=3), config, seed=1, device=CPU)
    macs = ArchitectureCost("macs", channels=4, layers=3, num_classes=3, in_channels=1, input_size=8)
    costs = [macs(encoding.decode(v)) for v in result.arrays["archive_encodings"]]
    np.testing.assert_array_equal(result.arrays["archive_cost"], costs)
    four = result.stages[0]["four_best"]
    assert [costs[i] for i in four] == sorted((costs[i] for i in four), reverse=True)
    assert result.stages[0]["chosen"] == four[min(2, len(four) - 1)]


# --------------------------------------------------------------------------- 2. the reference's subset selection


def test_select_by_spread_known_answers():
    front = np.array([0.0, 10.0])
    # one candidate: cost 5 halves 0..10, gaps (5, 5), spread 0
    assert select_by_spread(np.array([1.0, 5.0, 9.0, 5.5]), front, 1) == [1]
    # three: 2.5, 5 and 7.5 split 0..10 into four equal gaps
    assert select_by_spread(np.array([2.5, 9.0, 5.0, 1.0, 7.5]), front, 3) == [0, 2, 4]
    # a cost already on the front makes a zero gap: 3 (gaps 3, 2, 5) beats 10 (5, 5, 0)
    assert select_by_spread(np.array([10.0, 3.0]), np.array([0.0, 5.0, 10.0]), 1) == [1]
    assert select_by_spread(np.array([3.0, 1.0]), front, 5) == [0, 1]
    assert select_by_spread(np.array([3.0, 1.0]), front, 0) == []


def test_select_by_spread_ignores_the_predicted_error_where_ranking_first_does_not():
    # rows: (predicted error, cost); the third is dominated but its cost splits 0..10 evenly
    predicted = np.array([[0.1, 9.0], [0.2, 1.0], [0.9, 5.0]])
    front = np.array([0.0, 10.0])
    assert select_candidates(predicted, front, 1) == [0]     # rank first: 9 and 1 tie, lower error wins
    assert select_by_spread(predicted[:, 1], front, 1) == [2]


def test_select_by_spread_is_the_exact_minimum():
    """Against every subset of the given size, on random instances, with ties and with front
    costs among or outside the candidates' range."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        n, count = int(rng.integers(3, 10)), int(rng.integers(1, 4))
        costs = rng.integers(0, 30, n).astype(float) if trial % 2 else rng.random(n) * 10
        front = np.sort(rng.random(int(rng.integers(0, 4))) * 10)
        if len(front) + count < 2:
            continue
        chosen = select_by_spread(costs, front, count)
        assert len(chosen) == min(count, n) and chosen == sorted(set(chosen))
        best = min(spread_after(front, costs[list(s)].tolist()) for s in itertools.combinations(range(n), count))
        assert spread_after(front, costs[chosen].tolist()) == pytest.approx(best, abs=1e-9)


def test_select_by_spread_at_the_papers_sizes():
    """NSGA-II's population of 40, 8 to choose, a front of 15 (too many subsets to check them
    all): distinct indices, and no random subset leaves more even gaps."""
    rng = np.random.default_rng(4)
    costs, front = rng.random(40) * 1e6, np.sort(rng.random(15) * 1e6)
    chosen = select_by_spread(costs, front, 8)
    assert len(set(chosen)) == 8 and all(0 <= i < 40 for i in chosen)
    spread = spread_after(front, costs[chosen].tolist())
    assert all(spread <= spread_after(front, costs[rng.choice(40, 8, replace=False)].tolist()) + 1e-9
               for _ in range(500))


# --------------------------------------------------------------------------- 3. the RBF surrogate


def test_rbf_is_the_references_cubic_interpolant_with_a_linear_tail():
    """The reference's pySOT RBFInterpolant solves [[0, P^T], [P, Phi + eta I]] [lambda; c] = [0; y]
    with Phi_ij = |x_i - x_j|^3, P_i = (1, x_i) and eta = 1e-6, and predicts
    sum_j c_j |x - x_j|^3 + lambda . (1, x). Solved here directly; RbfPredictor agrees."""
    rng = np.random.default_rng(8)
    X, y = rng.random((30, 5)), rng.random(30)
    X_new = rng.random((10, 5))

    def distance(a, b):
        return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)

    P = np.column_stack([np.ones(len(X)), X])
    A = np.block([[np.zeros((6, 6)), P.T], [P, distance(X, X) ** 3 + 1e-6 * np.eye(len(X))]])
    solution = np.linalg.solve(A, np.concatenate([np.zeros(6), y]))
    tail, weights = solution[:6], solution[6:]
    reference = distance(X_new, X) ** 3 @ weights + np.column_stack([np.ones(len(X_new)), X_new]) @ tail
    model = RbfPredictor().fit(X, y)
    assert (model.kernel, model.degree) == ("cubic", 1)
    np.testing.assert_allclose(model.predict(X_new), reference, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- 4. fine-tuning each candidate


def _finetuning_setup(epochs: int = 3):
    torch.manual_seed(0)
    supernet = OneShotSupernet(channels=4, num_classes=3, layers=3, in_channels=1)
    data = toy(32, seed=5)
    common = dict(mean=(0.5,), std=(0.25,))
    calibration = [x for x, _ in BatchLoader(data, 16, shuffle=False, seed=0, **common)]
    recipe = tiny_config(finetune_epochs=epochs, finetune_lr=0.05, finetune_batch_size=8).finetuning()
    evaluate = FinetunedPathEvaluator(
        supernet, calibration, lambda: BatchLoader(data, 8, shuffle=True, seed=1, **common),
        BatchLoader(toy(24, seed=6), 12, shuffle=False, seed=0, **common), recipe)
    return supernet, evaluate


def test_finetuning_trains_a_copy_of_the_path_and_leaves_the_supernet_alone():
    supernet, evaluate = _finetuning_setup()
    genotype = random_genotype(np.random.default_rng(4))
    before = copy.deepcopy(supernet.state_dict())
    model, curve = evaluate.finetuned(genotype)
    after = supernet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)      # the supernet untouched
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]          # the copy learns
    assert [row["lr"] for row in curve] == pytest.approx([0.05, 0.0375, 0.0125])   # cosine to 0 over 3 epochs
    tuned = dict(model.named_parameters())
    on_path = {id(p) for m in model.path_modules(genotype) for p in m.parameters()}
    changed = {name for name, p in tuned.items() if not torch.equal(p, before[name])}
    assert changed and all(id(tuned[name]) in on_path for name in changed)   # only the path's weights moved
    assert not torch.equal(tuned["net.classifier.weight"], before["net.classifier.weight"])


def test_finetuned_measure_does_not_depend_on_what_was_measured_before():
    supernet, evaluate = _finetuning_setup(epochs=1)
    rng = np.random.default_rng(5)
    a, b = random_genotype(rng), random_genotype(rng)
    first = evaluate(a)
    evaluate(b)
    assert evaluate(a) == first
    with pytest.raises(ValueError, match="epochs"):
        FinetunedPathEvaluator(supernet, evaluate.calibration, evaluate.training, evaluate.validation,
                               tiny_config().finetuning())


# --------------------------------------------------------------------------- the defaults and the options together


#: what the tiny search of ``test_tiny_search_end_to_end`` gave before the options existed:
#: correct answers out of 48 per measured architecture, the encodings measured in iterations 1
#: and 2, a digest of every encoding, and the four best and the retrained one
BEFORE_CORRECT = [16, 18, 14, 16, 11, 12, 15, 15, 16, 19, 22, 22]
BEFORE_PROPOSED = [
    [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0],
    [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0],
    [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2, 0, 0],
]
BEFORE_DIGEST = "d8ae6117c6330bcc"


def test_the_defaults_give_the_results_from_before_the_options():
    config = tiny_config()
    assert (config.cost, config.candidate_selection, config.finetune_epochs, config.predictor) == \
        ("params", "rank", 0, "adaptive")
    result = nsganetv2_search(toy(48, seed=0), toy(48, seed=1), config, seed=0, device=CPU)
    assert [round(row["val_acc"] * 48) for row in result.history] == BEFORE_CORRECT
    encodings = result.arrays["archive_encodings"]
    assert encodings[8:].tolist() == BEFORE_PROPOSED
    assert hashlib.sha256(np.ascontiguousarray(encodings).tobytes()).hexdigest()[:16] == BEFORE_DIGEST
    assert (result.stages[0]["four_best"], result.stages[0]["chosen"]) == ([10, 11], 11)


def test_tiny_search_with_the_reference_options():
    """The paper's settings together: rbf, multiply-accumulates, the reference's selection and
    fine-tuning; the same design is measured, differently, since every candidate is fine-tuned."""
    data = toy(48, seed=0), toy(48, seed=1)
    plain = nsganetv2_search(*data, tiny_config(iterations=0), seed=0, device=CPU)
    config = tiny_config(predictor="rbf", cost="macs", candidate_selection="spread", finetune_epochs=1,
                         finetune_batch_size=16)
    result = nsganetv2_search(*data, config, seed=0, device=CPU)
    history = result.history
    assert len(history) == 12 and [row["iteration"] for row in history] == [0] * 8 + [1, 1, 2, 2]
    assert len({encoding.key(v) for v in result.arrays["archive_encodings"]}) == 12
    assert result.stages[0]["surrogate"] == "rbf" and result.stages[0]["cost"] == "macs"
    assert [row["genotype"] for row in history[:8]] == [row["genotype"] for row in plain.history]
    assert [row["val_acc"] for row in history[:8]] != [row["val_acc"] for row in plain.history]


@pytest.mark.parametrize("field, value", [("candidate_selection", "ranked"), ("finetune_epochs", -1),
                                          ("finetune_lr", 0.0), ("finetune_batch_size", 0)])
def test_config_refuses_bad_option_values(field, value):
    with pytest.raises(ValueError, match=field):
        Nsganetv2Config(**{field: value})
