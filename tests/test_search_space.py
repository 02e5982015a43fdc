"""Tests for the DARTS search space: operations, genotypes, the supernet and the evaluation network.

Parameter counts are pinned to the numbers measured by running the reference
implementations (``quark0/darts`` and ``chenxin061/pdarts``) at the same settings.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbutils.space import network as network_mod
from nbutils.space.genotype import (
    DEFAULT_CONCAT,
    NUM_EDGES,
    PUBLISHED,
    STEPS,
    Genotype,
    genotype_from_alpha,
    iter_edges,
    parse_alpha,
    published,
    random_genotype,
)
from nbutils.space.network import AuxiliaryHead, EvalNetwork, count_parameters, drop_path
from nbutils.space.ops import PRIMITIVES, FactorizedReduce, Identity, build_op
from nbutils.space.supernet import SuperNet

from toys import toy_supernet

NON_NONE = [p for p in PRIMITIVES if p != "none"]


def n_params(params) -> int:
    return sum(p.numel() for p in params)


# --------------------------------------------------------------------------- primitives


def test_primitives_reference_order():
    assert PRIMITIVES == (
        "none",
        "max_pool_3x3",
        "avg_pool_3x3",
        "skip_connect",
        "sep_conv_3x3",
        "sep_conv_5x5",
        "dil_conv_3x3",
        "dil_conv_5x5",
    )
    assert NUM_EDGES == 14 and STEPS == 4
    assert list(iter_edges()) == [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (4, 0), (4, 1), (4, 2), (4, 3),
                                  (5, 0), (5, 1), (5, 2), (5, 3), (5, 4)]


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("size", [8, 7])
def test_every_op_keeps_channels_and_halves_on_stride_2(name, size):
    torch.manual_seed(0)
    x = torch.randn(2, 4, size, size)
    for stride in (1, 2):
        op = build_op(name, 4, stride, affine=True)
        y = op(x)
        expected = size if stride == 1 else (size + 1) // 2
        assert y.shape == (2, 4, expected, expected), (name, stride)
    # stride-1 skip_connect is the identity, stride-2 a FactorizedReduce
    assert isinstance(build_op("skip_connect", 4, 1, True), Identity)
    assert isinstance(build_op("skip_connect", 4, 2, True), FactorizedReduce)


def test_none_op_is_zero_and_unknown_op_refused():
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(build_op("none", 4, 1, False)(x), torch.zeros_like(x))
    assert torch.equal(build_op("none", 4, 2, False)(x), torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="conv_7x7"):
        build_op("conv_7x7", 4, 1, False)


# --------------------------------------------------------------------------- FactorizedReduce


def test_factorized_reduce_matches_reference_formula_on_even_input():
    torch.manual_seed(1)
    fr = FactorizedReduce(6, 8, affine=True)
    with torch.no_grad():  # non-trivial BN affine parameters
        fr.bn.weight.uniform_(0.5, 1.5)
        fr.bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 6, 8, 8)
    for mode in ("train", "eval"):
        getattr(fr, mode)()
        if mode == "eval":
            with torch.no_grad():
                fr.bn.running_mean.uniform_(-0.2, 0.2)
                fr.bn.running_var.uniform_(0.5, 2.0)
        r = F.relu(x)
        a = F.conv2d(r, fr.conv_1.weight, stride=2)
        b = F.conv2d(r[:, :, 1:, 1:], fr.conv_2.weight, stride=2)
        cat = torch.cat([a, b], dim=1)
        if mode == "train":
            mean = cat.mean(dim=(0, 2, 3), keepdim=True)
            var = cat.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        else:
            mean = fr.bn.running_mean.view(1, -1, 1, 1)
            var = fr.bn.running_var.view(1, -1, 1, 1)
        ref = (cat - mean) / torch.sqrt(var + fr.bn.eps) * fr.bn.weight.view(1, -1, 1, 1) + fr.bn.bias.view(1, -1, 1, 1)
        out = fr(x)
        assert out.shape == (4, 8, 4, 4)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_factorized_reduce_odd_input():
    """7x7 -> 4x4; conv_2 reads the pixels (1 + 2i, 1 + 2j) and zeros past the border."""
    torch.manual_seed(2)
    fr = FactorizedReduce(3, 4, affine=False)
    seen = {}
    fr.conv_2.register_forward_hook(lambda m, i, o: seen.__setitem__("conv_2", o.detach()))
    fr.conv_1.register_forward_hook(lambda m, i, o: seen.__setitem__("conv_1", o.detach()))
    x = torch.randn(2, 3, 7, 7)
    out = fr(x)
    assert out.shape == (2, 4, 4, 4)
    r = F.relu(x)
    w1 = fr.conv_1.weight[:, :, 0, 0]
    w2 = fr.conv_2.weight[:, :, 0, 0]
    expected_1 = torch.einsum("oc,nchw->nohw", w1, r[:, :, 0::2, 0::2])
    torch.testing.assert_close(seen["conv_1"], expected_1)
    expected_2 = torch.zeros(2, 2, 4, 4)
    expected_2[:, :, :3, :3] = torch.einsum("oc,nchw->nohw", w2, r[:, :, 1::2, 1::2])
    torch.testing.assert_close(seen["conv_2"], expected_2)
    # non-square, one side odd
    assert fr(torch.randn(2, 3, 8, 7)).shape == (2, 4, 4, 4)


def test_factorized_reduce_refuses_odd_channels():
    with pytest.raises(ValueError, match="even"):
        FactorizedReduce(4, 5, affine=False)


# --------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "channels, layers, num_classes, expected",
    [(16, 8, 10, 1930618), (16, 5, 10, 1275834), (8, 5, 10, 394210), (16, 8, 100, 1953748)],
)
def test_supernet_parameter_counts_match_reference(channels, layers, num_classes, expected):
    model = SuperNet(channels=channels, num_classes=num_classes, layers=layers, in_channels=3)
    assert n_params(model.weights()) == expected
    assert n_params(model.arch_parameters()) == 2 * 14 * 8
    assert n_params(model.parameters()) == expected + 2 * 14 * 8
    if (channels, layers, num_classes) == (16, 8, 10):
        assert n_params(model.parameters()) == 1930842


@pytest.mark.parametrize(
    "name, num_classes, total, without_aux",
    [
        ("DARTS_V2", 10, 3825768, 3349342),
        ("DARTS_V1", 10, 3645840, 3169414),
        ("PDARTS", 10, 3910224, 3433798),
        ("DARTS_V2", 100, 3946908, 3401272),
        ("PDARTS", 100, 4031364, 3485728),
    ],
)
def test_eval_network_parameter_counts_match_reference(name, num_classes, total, without_aux):
    model = EvalNetwork(published(name), channels=36, num_classes=num_classes, layers=20, auxiliary=True,
                        in_channels=3, input_size=32)
    assert count_parameters(model) == total
    assert count_parameters(model, exclude_auxiliary=True) == without_aux
    assert n_params(model.auxiliary_head.parameters()) == total - without_aux


@pytest.mark.parametrize("name, expected", [("DARTS_V2", 246106), ("DARTS_V1", 232890), ("PDARTS", 292026)])
def test_small_eval_network_parameter_counts_match_reference(name, expected):
    model = EvalNetwork(published(name), channels=16, num_classes=10, layers=8, auxiliary=False)
    assert model.auxiliary_head is None
    assert count_parameters(model) == expected
    assert count_parameters(model, exclude_auxiliary=True) == expected


# --------------------------------------------------------------------------- discretisation


def reference_parse(weights: np.ndarray) -> list[tuple[str, int]]:
    """Transcription of quark0/darts ``Network.genotype()._parse`` (cnn/model_search.py)."""
    gene = []
    n = 2
    start = 0
    none = PRIMITIVES.index("none")
    for i in range(4):
        end = start + n
        W = weights[start:end].copy()
        edges = sorted(range(i + 2), key=lambda x: -max(W[x][k] for k in range(len(W[x])) if k != none))[:2]
        for j in edges:
            k_best = None
            for k in range(len(W[j])):
                if k != none:
                    if k_best is None or W[j][k] > W[j][k_best]:
                        k_best = k
            gene.append((PRIMITIVES[k_best], j))
        start = end
        n += 1
    return gene


def op_index(name: str) -> int:
    return PRIMITIVES.index(name)


def hand_made_weights() -> tuple[np.ndarray, tuple]:
    """A 'softmaxed' alpha (positive entries) whose discretisation is known by construction."""
    w = np.full((14, 8), 0.01)
    # node 2 (rows 0, 1): sep_conv_3x3 from input 1 strongly, max_pool from input 0
    w[0, op_index("max_pool_3x3")] = 0.5
    w[1, op_index("sep_conv_3x3")] = 0.9
    # node 3 (rows 2, 3, 4): row 2 (input 0) has by far the largest weight, on 'none': ignored
    w[2, op_index("none")] = 0.99
    w[2, op_index("avg_pool_3x3")] = 0.02
    w[3, op_index("dil_conv_5x5")] = 0.3
    w[4, op_index("skip_connect")] = 0.2
    # node 4 (rows 5..8): ties. Rows 6, 7, 8 (inputs 1, 2, 3) all have strength 0.4 -> inputs 1, 2
    # (stable: lower index first). Row 6 ties sep_conv_5x5 / dil_conv_3x3 -> sep_conv_5x5 (lower index).
    w[5, op_index("none")] = 0.7
    w[6, op_index("sep_conv_5x5")] = 0.4
    w[6, op_index("dil_conv_3x3")] = 0.4
    w[7, op_index("avg_pool_3x3")] = 0.4
    w[8, op_index("skip_connect")] = 0.4
    # node 5 (rows 9..13): input 4 strongest (dil_conv_3x3), then input 0 (sep_conv_3x3);
    # row 10 (input 1) is all equal: its arg-max would be max_pool_3x3 (lowest non-none index)
    w[9, op_index("sep_conv_3x3")] = 0.7
    w[13, op_index("dil_conv_3x3")] = 0.8
    expected = (
        ("sep_conv_3x3", 1), ("max_pool_3x3", 0),
        ("dil_conv_5x5", 1), ("skip_connect", 2),
        ("sep_conv_5x5", 1), ("avg_pool_3x3", 2),
        ("dil_conv_3x3", 4), ("sep_conv_3x3", 0),
    )
    return w, expected


def test_parse_alpha_hand_made():
    w, expected = hand_made_weights()
    assert parse_alpha(w) == expected
    assert tuple(reference_parse(w)) == expected  # the transcription agrees with the hand answer


def test_parse_alpha_ties_go_to_lower_index():
    w = np.full((14, 8), 0.125)  # uniform: every edge and op tied
    gene = parse_alpha(w)
    # each node: inputs 0 and 1 (in that order), op max_pool_3x3 (index 1, 'none' skipped)
    assert gene == (("max_pool_3x3", 0), ("max_pool_3x3", 1)) * 4


def test_parse_alpha_agrees_with_reference_on_random_alphas():
    rng = np.random.default_rng(0)
    for trial in range(300):
        if trial % 2:
            w = rng.random((14, 8))
        else:  # coarse values: many ties between edges and between ops
            w = rng.integers(0, 3, size=(14, 8)).astype(float)
        assert list(parse_alpha(w)) == reference_parse(w), trial


def test_parse_alpha_refuses_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        parse_alpha(np.zeros((14, 7)))


def hand_made_raw_alpha() -> tuple[np.ndarray, tuple]:
    """A raw (pre-softmax) alpha whose discretisation after the row softmax is known by hand."""
    a = np.zeros((14, 8))
    a[0, op_index("max_pool_3x3")] = 2.0
    a[1, op_index("sep_conv_3x3")] = 4.0
    a[2, op_index("none")] = 10.0  # the largest raw value of the matrix, on 'none': ignored
    a[2, op_index("avg_pool_3x3")] = 0.5
    a[3, op_index("dil_conv_5x5")] = 3.0
    a[4, op_index("skip_connect")] = 2.0
    a[5, op_index("none")] = 8.0
    a[6, op_index("sep_conv_5x5")] = 3.0  # tie within the row -> sep_conv_5x5 (lower index)
    a[6, op_index("dil_conv_3x3")] = 3.0  # softmax: e^3 / (2 e^3 + 6) = 0.435
    a[7, op_index("avg_pool_3x3")] = 1.0
    a[8, op_index("skip_connect")] = 2.0  # softmax: e^2 / (e^2 + 7) = 0.514 > 0.435
    a[9, op_index("sep_conv_3x3")] = 3.0
    a[13, op_index("dil_conv_3x3")] = 4.0
    expected = (
        ("sep_conv_3x3", 1), ("max_pool_3x3", 0),
        ("dil_conv_5x5", 1), ("skip_connect", 2),
        ("skip_connect", 3), ("sep_conv_5x5", 1),
        ("dil_conv_3x3", 4), ("sep_conv_3x3", 0),
    )
    return a, expected


def softmax_rows(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_genotype_from_alpha_softmaxes_then_parses():
    raw, expected = hand_made_raw_alpha()
    reduce_raw = np.zeros((14, 8))
    reduce_raw[:, op_index("dil_conv_5x5")] = 1.0
    g = genotype_from_alpha(raw, reduce_raw)
    assert g.normal == expected
    assert g.reduce == (("dil_conv_5x5", 0), ("dil_conv_5x5", 1)) * 4
    assert g.normal_concat == (2, 3, 4, 5) and g.reduce_concat == (2, 3, 4, 5)
    # the softmax matters: on the raw values node 4 would rank sep_conv_5x5 from input 1 (3.0)
    # above skip_connect from input 3 (2.0); after the row softmax the skip edge is stronger
    assert parse_alpha(raw)[4:6] == (("sep_conv_5x5", 1), ("skip_connect", 3))
    rng = np.random.default_rng(3)
    for _ in range(50):
        a, b = rng.normal(size=(14, 8)) * 3, rng.normal(size=(14, 8)) * 3
        g = genotype_from_alpha(a, b)
        assert list(g.normal) == reference_parse(softmax_rows(a))
        assert list(g.reduce) == reference_parse(softmax_rows(b))


def test_supernet_genotype_uses_its_alpha():
    model = toy_supernet()
    raw, expected = hand_made_raw_alpha()
    reduce_raw = np.zeros((14, 8))
    reduce_raw[:, op_index("avg_pool_3x3")] = 5.0
    reduce_raw[:, op_index("none")] = 9.0  # largest everywhere, must be ignored
    with torch.no_grad():
        model.alpha_normal.copy_(torch.tensor(raw, dtype=torch.float32))
        model.alpha_reduce.copy_(torch.tensor(reduce_raw, dtype=torch.float32))
    g = model.genotype()
    assert g.normal == expected
    assert g.reduce == (("avg_pool_3x3", 0), ("avg_pool_3x3", 1)) * 4
    alphas = model.alphas_numpy()
    np.testing.assert_array_equal(alphas["alpha_reduce"], reduce_raw.astype(np.float32))
    np.testing.assert_array_equal(alphas["alpha_normal"], raw.astype(np.float32))


def test_supernet_alpha_init_is_small_and_seeded():
    a = toy_supernet(seed=5)
    b = toy_supernet(seed=5)
    c = toy_supernet(seed=6)
    assert a.alpha_normal.shape == (14, 8) and a.alpha_reduce.shape == (14, 8)
    assert torch.equal(a.alpha_normal, b.alpha_normal) and torch.equal(a.alpha_reduce, b.alpha_reduce)
    assert not torch.equal(a.alpha_normal, c.alpha_normal)
    assert not torch.equal(a.alpha_normal, a.alpha_reduce)
    assert float(a.alpha_normal.detach().abs().max()) < 1e-2  # 1e-3 * N(0, 1)


# --------------------------------------------------------------------------- random genotypes


def test_random_genotypes_are_valid_and_cover_all_ops():
    ops = Counter()
    pairs = {node: Counter() for node in range(2, 6)}
    for seed in range(300):
        g = random_genotype(np.random.default_rng(seed))
        for cell in ("normal", "reduce"):
            gene = getattr(g, cell)
            assert len(gene) == 8
            for i in range(STEPS):
                (op_a, src_a), (op_b, src_b) = gene[2 * i], gene[2 * i + 1]
                node = 2 + i
                assert src_a != src_b, (seed, cell, node)
                assert 0 <= src_a < node and 0 <= src_b < node
                pairs[node][frozenset((src_a, src_b))] += 1
                ops.update([op_a, op_b])
            assert g.normal_concat == DEFAULT_CONCAT
    assert "none" not in ops
    assert set(ops) == set(NON_NONE)
    total = sum(ops.values())  # 300 * 2 * 8 = 4800 draws, 686 expected per op
    for op in NON_NONE:
        assert abs(ops[op] / total - 1 / 7) < 0.03, (op, ops[op])
    for node in range(2, 6):  # every pair of distinct earlier states is drawn
        assert set(pairs[node]) == {frozenset(p) for p in combinations(range(node), 2)}


def test_random_genotype_deterministic_per_seed():
    for seed in range(20):
        assert random_genotype(np.random.default_rng(seed)) == random_genotype(np.random.default_rng(seed))
    distinct = {random_genotype(np.random.default_rng(seed)).to_json() for seed in range(20)}
    assert len(distinct) == 20


# --------------------------------------------------------------------------- genotype objects


def test_published_darts_v2_literal():
    literal = Genotype(
        normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
        reduce_concat=[2, 3, 4, 5],
    )
    assert published("DARTS_V2") == literal
    assert published("DARTS_V2").normal[7] == ("dil_conv_3x3", 2)
    assert set(PUBLISHED) == {"DARTS_V1", "DARTS_V2", "PDARTS"}


@pytest.mark.parametrize("seed", range(5))
def test_json_round_trip_random(seed):
    g = random_genotype(np.random.default_rng(seed))
    text = g.to_json()
    back = Genotype.from_json(text)
    assert back == g
    assert json.loads(text) == g.to_dict()
    assert Genotype.from_dict(json.loads(json.dumps(g.to_dict()))) == g


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_json_round_trip_published(name):
    g = published(name)
    d = json.loads(g.to_json())
    assert d["normal"] == [list(p) for p in g.normal]
    assert d["reduce_concat"] == [2, 3, 4, 5]
    assert Genotype.from_json(g.to_json()) == g


def test_from_dict_default_concat_and_unknown_keys():
    d = published("PDARTS").to_dict()
    del d["normal_concat"], d["reduce_concat"]
    assert Genotype.from_dict(d) == published("PDARTS")
    with pytest.raises(ValueError, match="colour"):
        Genotype.from_dict({**d, "colour": 1})


def test_unknown_genotype_name_refused():
    with pytest.raises(ValueError, match="DARTS_V3"):
        published("DARTS_V3")


def test_unknown_operation_refused():
    d = published("DARTS_V2").to_dict()
    d["normal"][3] = ["conv_7x7", 1]
    with pytest.raises(ValueError, match=r"normal\[3\].*unknown operation 'conv_7x7'"):
        Genotype.from_dict(d)


def test_none_operation_refused():
    d = published("DARTS_V2").to_dict()
    d["reduce"][0] = ["none", 0]
    with pytest.raises(ValueError, match=r"reduce\[0\].*'none'"):
        Genotype.from_dict(d)


def test_input_from_non_existent_node_refused():
    d = published("DARTS_V2").to_dict()
    d["normal"][1] = ["sep_conv_3x3", 2]  # node 2 reading input 2 (itself)
    with pytest.raises(ValueError, match=r"node 2 reads input 2"):
        Genotype.from_dict(d)
    d = published("DARTS_V2").to_dict()
    d["reduce"][7] = ["max_pool_3x3", 5]  # node 5 reading itself
    with pytest.raises(ValueError, match=r"node 5 reads input 5"):
        Genotype.from_dict(d)
    d = published("DARTS_V2").to_dict()
    d["normal"][0] = ["sep_conv_3x3", -1]
    with pytest.raises(ValueError, match=r"node 2 reads input -1"):
        Genotype.from_dict(d)
    # the largest allowed input of node 5 is state 4
    d = published("DARTS_V2").to_dict()
    d["normal"][7] = ["sep_conv_3x3", 4]
    assert Genotype.from_dict(d).normal[7] == ("sep_conv_3x3", 4)


def test_wrong_gene_length_and_concat_refused():
    d = published("DARTS_V2").to_dict()
    with pytest.raises(ValueError, match="expected 8"):
        Genotype.from_dict({**d, "normal": d["normal"][:7]})
    with pytest.raises(ValueError, match="normal_concat"):
        Genotype.from_dict({**d, "normal_concat": [2, 3, 6]})


def count_literal(gene):
    conv = sum(op.startswith(("sep_conv", "dil_conv")) for op, _ in gene)
    pool = sum(op.endswith("pool_3x3") for op, _ in gene)
    skip = sum(op == "skip_connect" for op, _ in gene)
    return {"conv": conv, "pool": pool, "skip": skip}


def test_counts_and_summary_darts_v2():
    g = published("DARTS_V2")
    # counted by hand from the literal: normal 5 sep_conv + 1 dil_conv, 2 skip; reduce 5 max_pool, 3 skip
    assert g.counts("normal") == {"conv": 6, "pool": 0, "skip": 2}
    assert g.counts("reduce") == {"conv": 0, "pool": 5, "skip": 3}
    assert g.summary() == "normal: 6 conv, 0 pool, 2 skip | reduce: 0 conv, 5 pool, 3 skip"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counts_match_counting_the_literal(name):
    g = published(name)
    for cell in ("normal", "reduce"):
        assert g.counts(cell) == count_literal(getattr(g, cell))
        assert sum(g.counts(cell).values()) == 8  # no 'none' in a genotype
    assert published("PDARTS").counts("reduce") == {"conv": 6, "pool": 2, "skip": 0}


# --------------------------------------------------------------------------- forward shapes


@pytest.mark.parametrize("in_channels, size", [(1, 28), (3, 32), (1, 14)])
def test_supernet_forward_shapes(in_channels, size):
    torch.manual_seed(0)
    model = SuperNet(channels=4, num_classes=5, layers=3, in_channels=in_channels, seed=0)
    x = torch.randn(2, in_channels, size, size)
    out = model(x)
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    # the alphas receive a gradient through the mixture
    out.sum().backward()
    assert model.alpha_normal.grad is not None and model.alpha_normal.grad.abs().sum() > 0
    assert model.alpha_reduce.grad is not None and model.alpha_reduce.grad.abs().sum() > 0


def test_supernet_refuses_too_few_layers():
    with pytest.raises(ValueError, match="layers"):
        SuperNet(channels=4, layers=2)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("in_channels, size", [(1, 28), (3, 32), (1, 14)])
def test_eval_network_forward_shapes(name, in_channels, size):
    torch.manual_seed(0)
    model = EvalNetwork(published(name), channels=4, num_classes=7, layers=3, auxiliary=True,
                        in_channels=in_channels, input_size=size)
    x = torch.randn(2, in_channels, size, size)
    model.train()
    logits, aux = model(x)
    assert logits.shape == (2, 7) and aux is not None and aux.shape == (2, 7)
    model.eval()
    logits, aux = model(x)
    assert logits.shape == (2, 7) and aux is None


def test_eval_network_without_head_returns_no_aux_in_training():
    model = EvalNetwork(published("DARTS_V2"), channels=4, num_classes=3, layers=3, auxiliary=False,
                        in_channels=1, input_size=8)
    model.train()
    logits, aux = model(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 3) and aux is None


def test_aux_head_same_parameters_at_28_and_32():
    g = published("DARTS_V2")
    m28 = EvalNetwork(g, channels=8, num_classes=10, layers=6, auxiliary=True, in_channels=3, input_size=28)
    m32 = EvalNetwork(g, channels=8, num_classes=10, layers=6, auxiliary=True, in_channels=3, input_size=32)
    assert count_parameters(m28) == count_parameters(m32)
    assert n_params(m28.auxiliary_head.parameters()) == n_params(m32.auxiliary_head.parameters())
    assert n_params(m28.auxiliary_head.parameters()) > 0
    # 32x32 input -> 8x8 at the head: the reference 5x5/3 average pool (to 2x2)
    assert isinstance(m32.auxiliary_head.features[1], nn.AvgPool2d)
    # the head itself maps both maps to logits
    c_aux = m28.auxiliary_head.features[2].in_channels
    assert m28.auxiliary_head(torch.randn(2, c_aux, 7, 7)).shape == (2, 10)
    assert m32.auxiliary_head(torch.randn(2, c_aux, 8, 8)).shape == (2, 10)


def test_aux_head_reference_pool_gives_2x2():
    head = AuxiliaryHead(4, 3, spatial=8)
    seen = {}
    head.features[2].register_forward_hook(lambda m, i, o: seen.__setitem__("shape", tuple(i[0].shape)))
    head(torch.randn(2, 4, 8, 8))
    assert seen["shape"] == (2, 4, 2, 2)
    head = AuxiliaryHead(4, 3, spatial=7)  # 28x28 input: 7x7 at the head, adaptive pool
    head.features[2].register_forward_hook(lambda m, i, o: seen.__setitem__("shape7", tuple(i[0].shape)))
    head(torch.randn(2, 4, 7, 7))
    assert seen["shape7"] == (2, 4, 2, 2)


# --------------------------------------------------------------------------- drop path


def expected_drop_path_calls(genotype: Genotype, layers: int) -> int:
    """Operations that are not identities, summed over the cells (reduction cells at L/3 and 2L/3)."""
    total = 0
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        gene = genotype.reduce if reduction else genotype.normal
        for op, src in gene:
            identity = op == "skip_connect" and (not reduction or src >= 2)
            total += not identity
    return total


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_drop_path_never_applied_to_identity(monkeypatch, name):
    calls = []
    real = network_mod.drop_path

    def recording(x, p):
        calls.append(p)
        return real(x, p)

    monkeypatch.setattr(network_mod, "drop_path", recording)
    g = published(name)
    model = EvalNetwork(g, channels=4, num_classes=3, layers=4, in_channels=1, input_size=8)
    model.drop_path_prob = 0.99
    model.train()
    model(torch.randn(4, 1, 8, 8))
    assert len(calls) == expected_drop_path_calls(g, 4)
    assert all(p == 0.99 for p in calls)
    # DARTS_V2 with 4 layers: normal cells 6 non-identity ops each (x2), reduce cells 5 each (x2)
    if name == "DARTS_V2":
        assert len(calls) == 22
    calls.clear()
    model.eval()
    model(torch.randn(4, 1, 8, 8))
    assert calls == []
    model.train()
    model.drop_path_prob = 0.0
    model(torch.randn(4, 1, 8, 8))
    assert calls == []


def test_identity_path_survives_drop_path():
    """Node 2 = skip(0) + skip(1): with drop probability 0.99 the node is still s0' + s1'."""
    gene = [("skip_connect", 0), ("skip_connect", 1)] + [("sep_conv_3x3", 0), ("sep_conv_3x3", 1)] * 3
    g = Genotype(normal=gene, reduce=gene, normal_concat=[2], reduce_concat=[2])
    torch.manual_seed(0)
    model = EvalNetwork(g, channels=4, num_classes=3, layers=3, in_channels=1, input_size=8)
    cell = model.cells[0]
    assert not cell.reduction
    s = torch.randn(8, 12, 8, 8)
    cell.train()
    out = cell(s, s, 0.99)
    expected = cell.preprocess0(s) + cell.preprocess1(s)
    torch.testing.assert_close(out, expected)


def test_drop_path_no_effect_in_eval_mode():
    torch.manual_seed(0)
    model = EvalNetwork(published("PDARTS"), channels=4, num_classes=3, layers=3, auxiliary=True,
                        in_channels=1, input_size=8)
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        model.drop_path_prob = 0.0
        ref, _ = model(x)
        model.drop_path_prob = 0.9
        out, aux = model(x)
    assert torch.equal(out, ref) and aux is None
    # while in training mode the same probability does change the output
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        model.drop_path_prob = 0.0
        a, _ = model(x)
        torch.manual_seed(1)
        model.drop_path_prob = 0.9
        b, _ = model(x)
    assert not torch.allclose(a, b)


def test_drop_path_function_zeros_whole_samples_and_rescales():
    torch.manual_seed(0)
    x = torch.rand(2000, 2, 3, 3) + 1.0
    y = drop_path(x.clone(), 0.25)
    per_sample = (y / x).flatten(1)
    kept = (per_sample - 1 / 0.75).abs().amax(1) < 1e-5
    dropped = per_sample.abs().amax(1) == 0
    assert bool((kept | dropped).all())  # every sample either fully kept (x / keep) or fully zeroed
    assert abs(dropped.float().mean().item() - 0.25) < 0.04


def test_supernet_mixed_op_structure():
    """Reference MixedOp: all eight candidates in PRIMITIVES order, a BN (affine=False) after each
    pool, no affine BN anywhere in the cells; reduction cells at L/3 and 2L/3 with doubled channels."""
    model = SuperNet(channels=4, num_classes=3, layers=6, in_channels=1)
    assert [c.reduction for c in model.cells] == [False, False, True, False, True, False]
    mixed = model.cells[0].edges[0]
    assert len(model.cells[0].edges) == 14 and len(mixed.ops) == 8
    for name, op in zip(PRIMITIVES, mixed.ops):
        if "pool" in name:
            assert isinstance(op, nn.Sequential) and len(op) == 2
            assert isinstance(op[0], nn.MaxPool2d if name.startswith("max") else nn.AvgPool2d)
            assert isinstance(op[1], nn.BatchNorm2d) and not op[1].affine
    for cell in model.cells:
        for m in cell.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert not m.affine
    assert model.classifier.in_features == 4 * 4 * 4  # 4 nodes x (C doubled twice)


# --------------------------------------------------------------------------- parameter partition


def test_weights_and_arch_parameters_partition_parameters():
    model = SuperNet(channels=4, num_classes=3, layers=3, in_channels=1)
    weights = list(model.weights())
    arch = model.arch_parameters()
    all_params = list(model.parameters())
    ids_w, ids_a, ids_all = {id(p) for p in weights}, {id(p) for p in arch}, {id(p) for p in all_params}
    assert len(ids_w) == len(weights) and len(ids_a) == 2
    assert ids_w.isdisjoint(ids_a)
    assert ids_w | ids_a == ids_all
    assert len(weights) + len(arch) == len(all_params)
    assert arch[0] is model.alpha_normal and arch[1] is model.alpha_reduce
    assert math.prod(arch[0].shape) == 14 * 8
