"""The two random samplers of the DARTS space (``random_genotype``'s ``inputs``) and what
consumes their genotypes: a node that reads one state twice (the audit's random baseline)
must build, train and retrain in the plain and the fast evaluation network, save and load,
and be drawn; the integer encoding refuses it by name."""
from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbutils.accel.fast_network import FastEvalNetwork, accelerate
from nbutils.pipeline import steps
from nbutils.report.figures import cell_diagram
from nbutils.space.encoding import encode
from nbutils.space.genotype import STEPS, Genotype, random_genotype
from nbutils.space.network import EvalNetwork
from nbutils.space.ops import PRIMITIVES
from nbutils.training.train import RetrainConfig, retrain
from toys import toy

OPERATIONS = [p for p in PRIMITIVES if p != "none"]
CPU = torch.device("cpu")

#: every node reads one state twice: two different convolutions, the same convolution twice,
#: two skips, two pools of one kind and a pool with a convolution (the reduction cell's strided
#: edges too)
REPEATED = Genotype(
    normal=[("sep_conv_3x3", 1), ("dil_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_5x5", 0),
            ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 3), ("dil_conv_5x5", 3)],
    reduce=[("dil_conv_5x5", 0), ("sep_conv_3x3", 0), ("avg_pool_3x3", 1), ("avg_pool_3x3", 1),
            ("skip_connect", 1), ("skip_connect", 1), ("sep_conv_3x3", 4), ("max_pool_3x3", 4)],
)


def _repeats(genotype: Genotype) -> list[int]:
    """Per cell, per node: 1 if the node's two genes read the same state."""
    return [int(gene[2 * i][1] == gene[2 * i + 1][1]) for gene in (genotype.normal, genotype.reduce)
            for i in range(STEPS)]


# --------------------------------------------------------------------------- the samplers


def test_distinct_sampler_draws_what_it_drew_before():
    """Pinned from the code before the ``inputs`` option: the default's draws are unchanged."""
    g = random_genotype(np.random.default_rng(0))
    assert g == random_genotype(np.random.default_rng(0), sampler="distinct")
    assert g.normal == (("sep_conv_3x3", 0), ("avg_pool_3x3", 1), ("max_pool_3x3", 0), ("avg_pool_3x3", 2),
                        ("sep_conv_3x3", 2), ("sep_conv_5x5", 3), ("sep_conv_3x3", 3), ("sep_conv_3x3", 4))
    assert g.reduce == (("dil_conv_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("max_pool_3x3", 1),
                        ("avg_pool_3x3", 2), ("max_pool_3x3", 3), ("max_pool_3x3", 0), ("skip_connect", 3))
    g = random_genotype(np.random.default_rng(7))
    assert g.normal == (("sep_conv_5x5", 0), ("dil_conv_5x5", 1), ("avg_pool_3x3", 1), ("max_pool_3x3", 2),
                        ("dil_conv_5x5", 0), ("max_pool_3x3", 1), ("dil_conv_3x3", 1), ("max_pool_3x3", 4))
    assert g.reduce == (("skip_connect", 0), ("skip_connect", 1), ("dil_conv_5x5", 0), ("sep_conv_3x3", 2),
                        ("sep_conv_3x3", 1), ("sep_conv_3x3", 2), ("sep_conv_5x5", 3), ("sep_conv_5x5", 4))
    rng = np.random.default_rng(123)
    random_genotype(rng)
    g = random_genotype(rng)   # the generator advances by the same draws as before
    assert g.normal == (("dil_conv_3x3", 0), ("avg_pool_3x3", 1), ("sep_conv_3x3", 0), ("max_pool_3x3", 2),
                        ("skip_connect", 1), ("max_pool_3x3", 3), ("dil_conv_3x3", 0), ("avg_pool_3x3", 2))
    assert g.reduce == (("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 1), ("avg_pool_3x3", 2),
                        ("dil_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("dil_conv_5x5", 2))


def test_independent_sampler_distribution():
    """Node j (states 0..j-1) reads one state twice with probability 1/j; every input of node j
    is uniform over its j states, every operation uniform over the seven non-``none`` ones."""
    rng = np.random.default_rng(2024)
    n = 6000
    genotypes = [random_genotype(rng, sampler="independent") for _ in range(n)]
    cells = 2 * n
    repeats = np.array([_repeats(g) for g in genotypes]).reshape(n, 2, STEPS).sum(axis=(0, 1))
    for i, count in enumerate(repeats):
        j = 2 + i
        p = 1 / j
        assert abs(count / cells - p) < 5 * np.sqrt(p * (1 - p) / cells), (j, count / cells, p)
    per_cell = repeats.sum() / cells
    assert abs(per_cell - 77 / 60) < 0.05   # 1/2 + 1/3 + 1/4 + 1/5
    for k in range(2 * STEPS):
        j = 2 + k // 2
        sources = Counter(g.normal[k][1] for g in genotypes)
        assert set(sources) == set(range(j))
        for count in sources.values():
            assert abs(count / n - 1 / j) < 5 * np.sqrt((1 / j) * (1 - 1 / j) / n)
    ops = Counter(op for g in genotypes for gene in (g.normal, g.reduce) for op, _ in gene)
    assert set(ops) == set(OPERATIONS)   # none never, dil_conv_5x5 included
    total = sum(ops.values())
    for count in ops.values():
        assert abs(count / total - 1 / 7) < 5 * np.sqrt((1 / 7) * (6 / 7) / total)


def test_distinct_sampler_never_repeats_and_samplers_differ():
    rng = np.random.default_rng(5)
    assert not any(any(_repeats(random_genotype(rng))) for _ in range(500))
    assert any(any(_repeats(random_genotype(rng, sampler="independent"))) for _ in range(20))
    assert random_genotype(np.random.default_rng(1), sampler="independent") == \
        random_genotype(np.random.default_rng(1), sampler="independent")


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="sampler must be one of distinct, independent, got 'replace'"):
        random_genotype(np.random.default_rng(0), sampler="replace")


# --------------------------------------------------------------------------- the random search step


def test_random_search_step_reads_the_sampler(tmp_path):
    default = steps.search({"algorithm": "random", "seed": 11}, {}, tmp_path / "a")
    assert default["genotype"] == random_genotype(np.random.default_rng(11))
    independent = steps.search({"algorithm": "random", "seed": 11, "sampler": "independent"}, {}, tmp_path / "b")
    assert independent["genotype"] == random_genotype(np.random.default_rng(11), sampler="independent")
    assert steps.load_genotype(tmp_path / "b") == independent["genotype"]
    with pytest.raises(ValueError, match="sampler must be one of"):
        steps.search({"algorithm": "random", "seed": 11, "sampler": "with replacement"}, {}, tmp_path / "c")


# --------------------------------------------------------------------------- what reads such genotypes


def test_repeated_input_genotype_saves_and_loads():
    assert all(_repeats(REPEATED))
    assert Genotype.from_json(REPEATED.to_json()) == REPEATED
    assert json.loads(REPEATED.to_json())["normal"][0] == ["sep_conv_3x3", 1]


def test_encoding_refuses_a_repeated_input_by_name():
    with pytest.raises(ValueError, match="node 2 reads state 1 twice"):
        encode(REPEATED)


def test_cell_diagram_draws_both_edges_of_a_repeated_input():
    source = cell_diagram(REPEATED, "normal").source
    from_prev = [line for line in source.splitlines() if '"c_{k-1}" -> 0' in line]
    assert len(from_prev) == 2
    assert any("sep_conv_3x3" in line for line in from_prev) and any("dil_conv_3x3" in line for line in from_prev)


def test_repeated_inputs_train_alike_in_the_plain_and_the_fast_network():
    """One SGD step, float64: the fast network's logits, gradients and updated parameters are the
    plain network's (both nodes of an input's readers summed; shared pools and skips not written
    in place)."""
    kw = dict(channels=4, num_classes=3, layers=3, auxiliary=True, in_channels=3, input_size=8)
    torch.manual_seed(0)
    plain = EvalNetwork(REPEATED, **kw).double()
    fast = accelerate(copy.deepcopy(plain))
    assert isinstance(fast, FastEvalNetwork)
    initial = {n: p.detach().clone() for n, p in plain.named_parameters()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.arange(6) % 3
    outputs = []
    for model in (plain, fast):
        model.train()
        model.drop_path_prob = 0.0
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        logits, aux = model(x)
        loss = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        outputs.append((logits.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (lp, gp, pp), (lf, gf, pf) = outputs
    torch.testing.assert_close(lf, lp, rtol=1e-9, atol=1e-12)
    assert gp.keys() == gf.keys()
    for n in gp:
        torch.testing.assert_close(gf[n], gp[n], rtol=1e-8, atol=1e-11)
        torch.testing.assert_close(pf[n], pp[n], rtol=1e-9, atol=1e-12)
    # both convolutions reading state 1 in node 2 of the first cell learn
    for n in ("cells.0.ops.0.1.weight", "cells.0.ops.1.1.weight"):
        assert torch.count_nonzero(gp[n]) > 0 and not torch.equal(pp[n], initial[n])


@pytest.mark.parametrize("fast", [True, False], ids=["fast network", "plain network"])
def test_repeated_input_genotype_retrains(fast):
    train_set, test_set = toy(32, seed=3), toy(12, seed=4)
    config = RetrainConfig(epochs=1, channels=4, layers=3, batch_size=16, auxiliary=True, cutout=2, fast=fast)
    out = retrain(REPEATED, train_set, test_set, config, seed=0, device=CPU)
    assert isinstance(out["model"], FastEvalNetwork) == fast
    assert np.isfinite(out["test_loss"]) and np.isfinite(out["curve"][0]["train_loss"])
    assert 0.0 <= out["test_acc"] <= 1.0
