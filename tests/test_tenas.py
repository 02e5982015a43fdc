"""TE-NAS: the pruning rule on hand-made tables, the TE-NAS network, its indicators, and a tiny
end-to-end search."""
from __future__ import annotations

import functools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from nbutils.core.image_dataset import ImageDataset, channel_stats, resized
from nbutils.space.genotype import NUM_EDGES, STEPS, Genotype
from nbutils.space.ops import PRIMITIVES
from nbutils.nas import ntk as ntk_mod
from nbutils.nas import tenas as tenas_mod
from nbutils.nas.ntk import (
    condition_number,
    linear_regions,
    ntk_condition_number,
    ntk_from_gradients,
    per_sample_gradients,
    per_sample_gradients_loop,
)
from nbutils.nas.tenas import TenasConfig, genotype_of, tenas_search
from nbutils.nas.tenas_pruning import (edges_to_prune, operations_to_prune, rank_candidates, relative_change,
                                       round_significant)
from nbutils.nas.tenas_network import SEARCH_OPERATIONS, TenasNetwork, initial_switches
from nbutils.nas.zero_cost import MetricUndefined

from toys import toy


def _dataset(n: int = 48, size: int = 8, seed: int = 0, constant: bool = False) -> ImageDataset:
    """``n`` random images of ten classes (TE-NAS never reads the labels); ``constant``: every
    pixel 100, so every image is the same."""
    ds = toy(n, seed=seed, num_classes=10, size=size, random_labels=True)
    return ds.with_replacements(torch.arange(n), images=torch.full_like(ds.images, 100)) if constant else ds


# --------------------------------------------------------------------------- the pruning rule


def test_round_significant_and_relative_change():
    assert round_significant(0.0012345, 3) == pytest.approx(0.00123, abs=1e-15)
    assert round_significant(123456.0, 2) == pytest.approx(120000.0)
    assert round_significant(-0.5, 3) == pytest.approx(-0.5)
    assert round_significant(0.0, 3) == 0.0
    assert relative_change(10.0, 7.0, 3) == pytest.approx(0.3)
    assert relative_change(3.0, 4.0, 3) == pytest.approx(-0.333)


def test_rank_candidates_hand_table():
    # two edges of the normal cell: edge 0 with a, b, c; edge 1 with d, e
    a, b, c = ("normal", 0, "a"), ("normal", 0, "b"), ("normal", 0, "c")
    d, e = ("normal", 1, "d"), ("normal", 1, "e")
    kappa = {a: 0.30, b: 0.10, c: 0.10, d: -0.20, e: 0.05}
    regions = {a: 0.00, b: -0.50, c: 0.20, d: -0.10, e: -0.10}
    # kappa, descending, dense: a 0, b 1, c 1 (tie), e 2, d 3
    # regions, ascending, dense: b 0, d 1, e 1 (tie), a 2, c 3
    # sums: b 1, a 2, e 3, c 4, d 4 (c before d: c comes first in the kappa order)
    ranking = rank_candidates(kappa, regions, precision=3)
    assert ranking == [(b, 1, 0), (a, 0, 2), (e, 2, 1), (c, 1, 3), (d, 3, 1)]
    assert operations_to_prune(ranking, per_edge=1) == [b, e]
    assert sorted(operations_to_prune(ranking, per_edge=2)) == sorted([b, a, e, d])
    assert edges_to_prune(ranking, keep=2) == [b, a, e]
    assert edges_to_prune(ranking[:2], keep=2) == []


def test_rank_uses_significant_digits_for_order_and_exact_values_for_ties():
    # 0.12341 and 0.12349 sort as equal at 3 significant digits (stable: x stays first) but are
    # different values, so they get different ranks; the exact duplicate z shares y's rank.
    x, y, z = ("reduce", 3, "x"), ("reduce", 3, "y"), ("reduce", 3, "z")
    ranking = rank_candidates({x: 0.12341, y: 0.12349, z: 0.12349}, {x: 0.0, y: 0.0, z: 0.0}, precision=3)
    assert ranking == [(x, 0, 0), (y, 1, 0), (z, 1, 0)]
    # without the rounding y would come first
    ranking = rank_candidates({x: 0.12341, y: 0.12349, z: 0.12349}, {x: 0.0, y: 0.0, z: 0.0}, precision=6)
    assert [row[0] for row in ranking] == [y, z, x]


def test_rank_candidates_refuses_bad_tables():
    k = ("normal", 0, "a")
    with pytest.raises(ValueError, match="same candidates"):
        rank_candidates({k: 0.1}, {})
    with pytest.raises(ValueError, match="finite"):
        rank_candidates({k: float("nan")}, {k: 0.0})
    with pytest.raises(ValueError, match="per_edge"):
        operations_to_prune([], per_edge=0)


def test_config_is_validated():
    assert TenasConfig().batch_size == 14 and TenasConfig().channels == 1 and TenasConfig().repeats == 3
    with pytest.raises(ValueError, match="batch_size"):
        TenasConfig(batch_size=1)
    with pytest.raises(ValueError, match="cells"):
        TenasConfig(cells=1)
    with pytest.raises(ValueError, match="operations"):
        TenasConfig(operations=("none",))
    with pytest.raises(ValueError, match="repeats"):
        TenasConfig(repeats=0)
    assert TenasConfig(operations=("skip_connect", "max_pool_3x3")).operations == ("max_pool_3x3", "skip_connect")


# --------------------------------------------------------------------------- the network


def _network(switches=None, seed: int = 0, in_channels: int = 1, stem: bool = True) -> TenasNetwork:
    torch.manual_seed(seed)
    return TenasNetwork(switches or initial_switches(), channels=1, num_classes=10, in_channels=in_channels,
                        stem=stem).train()


def test_removed_operation_is_as_if_absent():
    candidate = ("normal", 3, "sep_conv_3x3")
    full = _network()
    switches = initial_switches()
    switches["normal"][3] = tuple(op for op in SEARCH_OPERATIONS if op != "sep_conv_3x3")
    pruned = _network(switches, seed=1)
    own = pruned.state_dict()
    pruned.load_state_dict({k: v for k, v in full.state_dict().items() if k in own})
    x = torch.randn(6, 1, 8, 8)
    with full.without([candidate]):
        assert torch.equal(full(x), pruned(x))
    assert full.removed == frozenset()
    assert not torch.equal(full(x), pruned(x))   # 1/7 vs 1/6 weights and one more operation


def test_fast_ntk_equals_loop_on_tenas_network_and_skips_removed_weights():
    net = _network()
    x = torch.randn(6, 1, 8, 8)
    candidate = ("reduce", 0, "dil_conv_5x5")
    removed_weights = sum(p.numel() for n, p in net.named_parameters()
                          if n.startswith("cells.1.edges.0.dil_conv_5x5.") and "weight" in n)
    assert removed_weights > 0
    full_fast = per_sample_gradients(net, x)
    with net.without([candidate]):
        fast, loop = per_sample_gradients(net, x), per_sample_gradients_loop(net, x)
        kappa = ntk_condition_number(net, x)
    assert fast.shape == loop.shape == (6, full_fast.shape[1] - removed_weights)
    torch.testing.assert_close(fast, loop, rtol=1e-4, atol=1e-5 * float(loop.abs().max()))
    kappa_loop, _, undefined = condition_number(ntk_from_gradients(loop))
    assert undefined is None and kappa.defined and kappa.kappa == pytest.approx(kappa_loop, rel=1e-4)


def test_indicators_leave_the_network_unchanged():
    net = _network()
    net.cells[0].eval()   # a mixed state must come back as it was
    net.removed = frozenset({("normal", 0, "max_pool_3x3")})
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    tracking = [m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    ntk_condition_number(net, torch.randn(5, 1, 8, 8))
    linear_regions(_network(stem=False), [torch.randn(50, 1, 3, 3)])
    linear_regions(net, [torch.randn(20, 1, 8, 8)])
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in net.modules()] == modes
    assert [m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)] == tracking
    assert all(p.grad is None for p in net.parameters())
    assert net.removed == frozenset({("normal", 0, "max_pool_3x3")})


def test_genotype_of_needs_two_edges_with_one_operation():
    switches = {kind: [()] * NUM_EDGES for kind in ("normal", "reduce")}
    offset = 0
    for node in range(STEPS):
        for kind in ("normal", "reduce"):
            switches[kind][offset] = ("skip_connect",)
            switches[kind][offset + 1 + node] = ("sep_conv_3x3",)
        offset += 2 + node
    genotype = genotype_of(switches)
    assert genotype.normal[:2] == (("skip_connect", 0), ("sep_conv_3x3", 1))
    assert genotype.normal[-2:] == (("skip_connect", 0), ("sep_conv_3x3", 4))
    switches["reduce"][0] = ("skip_connect", "max_pool_3x3")
    with pytest.raises(ValueError, match="reduce node 2"):
        genotype_of(switches)


# --------------------------------------------------------------------------- the search

_SMALL = dict(batch_size=4, repeats=1, region_batches=1, region_batch_size=64)


def _check_result(result, config: TenasConfig):
    json.dumps(result.history), json.dumps(result.stages)   # artifacts are JSON
    genotype = result.genotype
    assert isinstance(genotype, Genotype)
    for cell in (genotype.normal, genotype.reduce):   # two distinct inputs per node, one operation each
        for node in range(STEPS):
            (op_a, src_a), (op_b, src_b) = cell[2 * node: 2 * node + 2]
            assert src_a != src_b and {op_a, op_b} <= set(config.operations)
    active = result.arrays["active_normal"], result.arrays["active_reduce"]
    assert active[0].shape == (len(result.history) + 1, NUM_EDGES, 8)
    counts = [a.sum(axis=2) for a in active]
    assert np.all(counts[0][0] == len(config.operations))
    assert all(np.all(np.diff(c, axis=0) <= 0) for c in counts)        # operations only ever go away
    assert all(set(np.unique(c[-1])) <= {0.0, 1.0} for c in counts)    # at most one operation per edge
    # the last row of alive operations is the genotype
    for kind, cell, a in (("normal", genotype.normal, active[0]), ("reduce", genotype.reduce, active[1])):
        offset, expected = 0, np.zeros((NUM_EDGES, 8))
        for node in range(STEPS):
            for op, src in cell[2 * node: 2 * node + 2]:
                expected[offset + src, PRIMITIVES.index(op)] = 1.0
            offset += 2 + node
        assert np.array_equal(a[-1], expected), kind
        assert result.stages[-1]["alive"][kind] == [[PRIMITIVES[i] for i in np.flatnonzero(row)] for row in expected]


def test_tiny_search_ends_with_one_operation_per_edge_and_two_inputs_per_node():
    config = TenasConfig(operations=("max_pool_3x3", "skip_connect", "dil_conv_3x3"), prune_per_round=1,
                         fresh_batches=False, **_SMALL)
    result = tenas_search(_dataset(), config, seed=0, device="cpu")
    _check_result(result, config)
    stages = [row["stage"] for row in result.history]
    assert stages == ["operations"] * 2 + ["edges"] * 6         # 3 -> 2 -> 1 operations, then nodes 3, 4, 5 x 2
    first, second = result.history[0], result.history[1]
    assert len(first["candidates"]) == 2 * NUM_EDGES * 3 and len(first["pruned"]) == 2 * NUM_EDGES
    assert len(second["candidates"]) == 2 * NUM_EDGES * 2 and len(second["pruned"]) == 2 * NUM_EDGES
    for row in result.history:   # each row prunes what its own ranking says
        ranking = rank_candidates({(c["cell"], c["edge"], c["op"]): c["kappa_change"] for c in row["candidates"]},
                                  {(c["cell"], c["edge"], c["op"]): c["region_change"] for c in row["candidates"]})
        chosen = operations_to_prune(ranking, 1) if row["stage"] == "operations" else edges_to_prune(ranking)
        assert [tuple(p) for p in row["pruned"]] == chosen
        for c in row["candidates"]:
            (k0, k1), = c["kappa"]
            (r0, r1), = c["regions"]
            assert k0 > 1 and k1 > 1 and r0 >= 1 and r1 >= 1
            assert c["kappa_change"] == pytest.approx(relative_change(k0, k1, 3))
    # common data: the architecture's own values are the same for every candidate of a row
    assert len({c["kappa"][0][0] for c in first["candidates"]}) == 1


def test_search_is_deterministic_by_seed_and_reads_the_data():
    # one operation per edge: edge pruning only, on fresh batches (the reference's way)
    config = TenasConfig(operations=("dil_conv_3x3",), **_SMALL)
    data = _dataset(seed=1)
    a = tenas_search(data, config, seed=3, device="cpu")
    b = tenas_search(data, config, seed=3, device="cpu")
    _check_result(a, config)
    assert a.genotype == b.genotype
    assert [[(c["kappa"], c["regions"]) for c in row["candidates"]] for row in a.history] == \
           [[(c["kappa"], c["regions"]) for c in row["candidates"]] for row in b.history]
    first = a.history[0]["candidates"]
    # fresh batches: the architecture's own kappa differs between candidates
    assert len({c["kappa"][0][0] for c in first}) > 1
    # other images (a poisoned copy, say) change the measurements
    c = tenas_search(_dataset(seed=2), config, seed=3, device="cpu")
    assert [x["kappa"] for x in c.history[0]["candidates"]] != [x["kappa"] for x in first]


def test_undefined_ntk_is_an_error_not_a_number():
    config = TenasConfig(augment=False, **_SMALL)   # identical images: identical NTK rows, singular NTK
    with pytest.raises(MetricUndefined, match="round 1"):
        tenas_search(_dataset(constant=True), config, seed=0, device="cpu", normalisation=((0.5,), (0.25,)))


def test_bad_input_is_refused_before_compute():
    with pytest.raises(ValueError, match="at least batch_size"):
        tenas_search(_dataset(n=3), TenasConfig(**_SMALL | {"batch_size": 4}), seed=0, device="cpu")
    with pytest.raises(ValueError, match="TenasConfig"):
        tenas_search(_dataset(), {"batch_size": 4}, seed=0, device="cpu")


def test_image_size_measures_on_resized_images():
    config = TenasConfig(operations=("dil_conv_3x3",), **_SMALL)
    big = _dataset(size=16, seed=4)
    norm = channel_stats(big)
    a = tenas_search(big, replace(config, image_size=8), seed=3, device="cpu", normalisation=norm)
    b = tenas_search(resized(big, 8), config, seed=3, device="cpu", normalisation=norm)
    assert [[c["kappa"] for c in row["candidates"]] for row in a.history] == \
           [[c["kappa"] for c in row["candidates"]] for row in b.history]
    with pytest.raises(ValueError, match="image_size"):
        TenasConfig(image_size=4)


def test_search_on_16px_images_measures_through_replicas_as_through_vmap(monkeypatch):
    """From 16x16 on, the NTK of a TE-NAS search goes through replicas (nbutils.nas.ntk_replicas):
    the same measurements and the same genotype as through vmap."""
    config = TenasConfig(operations=("dil_conv_3x3",), **_SMALL)
    data = _dataset(size=16, seed=4)
    used = []
    choose = ntk_mod.choose_method
    monkeypatch.setattr(ntk_mod, "choose_method", lambda *a, **k: used.append(choose(*a, **k)) or used[-1])
    replicas = tenas_search(data, config, seed=1, device="cpu")
    assert set(used) == {"replicas"}
    monkeypatch.setattr(tenas_mod, "ntk_condition_number",
                        functools.partial(ntk_mod.ntk_condition_number, method="vmap"))
    vmap = tenas_search(data, config, seed=1, device="cpu")
    assert replicas.genotype == vmap.genotype
    for row_r, row_v in zip(replicas.history, vmap.history):
        for c_r, c_v in zip(row_r["candidates"], row_v["candidates"]):
            assert np.allclose(c_r["kappa"], c_v["kappa"], rtol=1e-4) and c_r["regions"] == c_v["regions"]
