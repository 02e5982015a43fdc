"""Tests for the training-free metrics: the six zero-cost metrics, TE-NAS's NTK condition
number and linear-region count.

Known answers come from running the reference implementations (SamsungLabs/zero-cost-nas,
hzf1174/RoBoT, VITA-Group/TENAS) on fixed networks and batches; how they were produced is
recorded in ``tests/fixtures/zero_cost_known_answers.json`` (key ``about``).
"""
from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nbutils.space.genotype import PUBLISHED
from nbutils.space.network import EvalNetwork
from nbutils.nas.ntk import (
    activation_patterns,
    condition_number,
    count_distinct,
    linear_regions,
    ntk_condition_number,
    ntk_condition_number_loop,
    ntk_condition_numbers,
    ntk_from_gradients,
    per_sample_gradients,
    per_sample_gradients_loop,
    region_inputs,
)
from nbutils.space.supernet import SuperNet
from nbutils.nas.zero_cost import (
    METRICS,
    MetricUndefined,
    MetricValues,
    compute_metrics,
    jacob_cov_score,
)

FIXTURE = Path(__file__).parent / "fixtures" / "zero_cost_known_answers.json"
RTOL = 1e-4


# --------------------------------------------------------------------------- fixture networks


class PlainConvNet(nn.Module):
    """As in the fixture generator: Conv(bias)-BN-ReLU x2, average pool, Linear; ``unused``
    is never called (its weight gets no gradient)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True), nn.BatchNorm2d(6), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(6, num_classes)
        self.unused = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class ThinNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
            nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
        )
        self.classifier = nn.Linear(2, 3)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


BUILDERS = {
    "darts_v2_tiny": lambda: EvalNetwork(
        PUBLISHED["DARTS_V2"], channels=4, layers=3, num_classes=3, auxiliary=False, in_channels=3, input_size=8
    ),
    "plain_convnet": lambda: PlainConvNet(3),
    "thin_net": lambda: ThinNet(),
}


def _decode(d: dict) -> torch.Tensor:
    dtype = np.dtype(d["dtype"]).newbyteorder("<")
    return torch.from_numpy(np.frombuffer(base64.b64decode(d["b64"]), dtype=dtype).reshape(d["shape"]).astype(d["dtype"]))


@pytest.fixture(scope="module")
def known() -> dict:
    return json.loads(FIXTURE.read_text())


def _network(known: dict, name: str) -> nn.Module:
    net = BUILDERS[name]()
    net.load_state_dict({k: _decode(v) for k, v in known["cases"][name]["state"].items()})
    return net


def _batch(known: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    case = known["cases"][name]
    return _decode(case["images"]), torch.tensor(case["labels"], dtype=torch.int64)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# --------------------------------------------------------------------------- zero-cost metrics


@pytest.fixture(scope="module")
def ours(known) -> dict[str, MetricValues]:
    out = {}
    for name in ("darts_v2_tiny", "plain_convnet"):
        images, labels = _batch(known, name)
        out[name] = compute_metrics(_network(known, name), images, labels, METRICS + ("synflow_bn",), "cpu")
    return out


def test_fixture_records_its_provenance(known):
    refs = known["about"]["references"]
    assert refs["SamsungLabs/zero-cost-nas"]["commit"] == "a43bfbc90c1a02a81fb4397a5e096759e93fbe50"
    assert refs["VITA-Group/TENAS"]["commit"] == "9df78ffd98573035375b12e19b9007578cc4155d"
    assert "generator_sources" in known["about"]


@pytest.mark.parametrize("case", ["darts_v2_tiny", "plain_convnet"])
@pytest.mark.parametrize("metric", list(METRICS) + ["synflow_bn"])
def test_metric_matches_zero_cost_nas(known, ours, case, metric):
    value, expected = ours[case][metric], known["zero_cost_nas"][case][metric]
    assert not ours[case].undefined
    assert _rel(value, expected) <= RTOL, (case, metric, value, expected)


def test_robot_variants(known, ours):
    """RoBoT computes the same five metrics; its DARTS-space synflow is the BN-keeping one."""
    robot, mine = known["robot"]["darts_v2_tiny"], ours["darts_v2_tiny"]
    for metric in ("grad_norm", "snip", "grasp", "fisher"):
        assert _rel(mine[metric], robot[metric]) <= RTOL
    assert _rel(mine["jacob_cov"], robot["jacov"]) <= RTOL
    assert _rel(mine["synflow_bn"], robot["synflow"]) <= RTOL
    assert _rel(mine["synflow"], robot["synflow"]) > 1.0  # BN removed: a different number
    # RoBoT's jacov drifts when one input tensor is reused; ours does not
    drift = known["robot"]["shared_input_tensor_same_network_twice"]
    assert drift["call_1"]["jacov"] != drift["call_2"]["jacov"]
    images, labels = _batch(known, "darts_v2_tiny")
    net = _network(known, "darts_v2_tiny")
    again = [compute_metrics(net, images, labels, ["jacob_cov"])["jacob_cov"] for _ in range(2)]
    assert again[0] == again[1]


def _snapshot(net: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in net.named_parameters()},
        "grad": {k: None if p.grad is None else p.grad.clone() for k, p in net.named_parameters()},
        "training": [m.training for m in net.modules()],
    }


def _assert_same(before: dict, after: dict) -> None:
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for k, g in before["grad"].items():
        assert (g is None and after["grad"][k] is None) or torch.equal(g, after["grad"][k]), k


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_metrics_leave_network_and_batch_unchanged(known, mode):
    net = _network(known, "darts_v2_tiny")
    net.train(mode == "train")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    convs[0].weight.requires_grad_(False)  # flags must survive (snip/grasp flip them on their copy)
    convs[1].weight.grad = torch.full_like(convs[1].weight, 0.5)  # a stale gradient must survive
    images, labels = _batch(known, "darts_v2_tiny")
    images_before = images.clone()
    before = _snapshot(net)
    result = compute_metrics(net, images, labels, METRICS + ("synflow_bn",))
    _assert_same(before, _snapshot(net))
    assert torch.equal(images, images_before) and not images.requires_grad and images.grad is None
    assert all(math.isfinite(v) for v in result.values())
    assert next(net.parameters()).dtype == torch.float32  # synflow's double() stayed on its copy


def test_metric_on_a_frozen_weight_follows_the_reference(known):
    """grad_norm skips a weight without gradient, snip (mask of ones) still scores it."""
    images, labels = _batch(known, "plain_convnet")
    net = _network(known, "plain_convnet")
    full = compute_metrics(net, images, labels, ["grad_norm", "snip"])
    net.features[0].weight.requires_grad_(False)
    frozen = compute_metrics(net, images, labels, ["grad_norm", "snip"])
    assert frozen["grad_norm"] < full["grad_norm"]
    assert frozen["snip"] == pytest.approx(full["snip"], rel=1e-6)


class _ConstantNet(nn.Module):
    """Logits that do not depend on the input: every input-Jacobian row is zero."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.conv(x * 0.0).mean((2, 3)))


def test_undefined_metric_is_nan_and_recorded():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 0])
    result = compute_metrics(_ConstantNet(), images, labels, ["grad_norm", "jacob_cov"])
    assert math.isnan(result["jacob_cov"]) and "constant" in result.undefined["jacob_cov"]
    assert "grad_norm" not in result.undefined and math.isfinite(result["grad_norm"])
    assert result.defined == {"grad_norm": result["grad_norm"]}
    with pytest.raises(MetricUndefined, match="jacob_cov"):
        compute_metrics(_ConstantNet(), images, labels, ["jacob_cov"], strict=True)


def test_jacob_cov_score_definition():
    rng = np.random.default_rng(0)
    jac = rng.normal(size=(5, 40))
    v = np.linalg.eigvalsh(np.corrcoef(jac))
    assert jacob_cov_score(jac) == pytest.approx(-np.sum(np.log(v + 1e-5) + 1 / (v + 1e-5)), rel=1e-12)
    jac[2] = 3.0
    with pytest.raises(MetricUndefined):
        jacob_cov_score(jac)


def test_unknown_metric_is_refused(known):
    images, labels = _batch(known, "plain_convnet")
    with pytest.raises(ValueError, match="unknown metrics"):
        compute_metrics(_network(known, "plain_convnet"), images, labels, ["naswot"])


# --------------------------------------------------------------------------- NTK


@pytest.mark.parametrize("case", ["plain_convnet", "darts_v2_tiny"])
def test_ntk_matches_tenas(known, case):
    net, (images, _) = _network(known, case), _batch(known, case)
    expected = known["tenas"]["ntk_kappa"][case]
    loop = ntk_condition_number_loop(net, images)
    fast = ntk_condition_number(net, images)
    assert loop.defined and fast.defined
    assert _rel(loop.kappa, expected) <= RTOL and _rel(fast.kappa, expected) <= RTOL
    assert ntk_condition_numbers([net, net], images)[1].kappa == pytest.approx(fast.kappa, rel=1e-12)


def test_fast_ntk_equals_loop_train_mode_with_bn(known):
    """float32 on the plain net (kappa and matrix), float64 on a DARTS evaluation network
    (every cell operation, BN in train mode): the batched rows are the loop's rows."""
    net, (images, _) = _network(known, "plain_convnet"), _batch(known, "plain_convnet")
    a, b = ntk_condition_number_loop(net, images), ntk_condition_number(net, images)
    assert _rel(b.kappa, a.kappa) <= 1e-5
    ka = ntk_from_gradients(per_sample_gradients_loop(net, images))
    kb = ntk_from_gradients(per_sample_gradients(net, images))
    assert np.linalg.norm(ka - kb) <= 1e-5 * np.linalg.norm(ka)

    darts, (x, _) = _network(known, "darts_v2_tiny").double(), _batch(known, "darts_v2_tiny")
    ga = per_sample_gradients_loop(darts, x.double())
    gb = per_sample_gradients(darts, x.double(), chunk_size=3)  # chunks of copies: same rows
    assert ga.dtype == torch.float64 and ga.shape == gb.shape
    assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-12 * ga.abs().max().item())


def test_fast_ntk_single_channel_backend_switch():
    """On C<=2 networks the fast path switches oneDNN off for its own computation (a backend
    choice: same rows up to rounding) and restores the global setting."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.BatchNorm2d(1), nn.ReLU(),
        nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3),
    )
    x = torch.randn(5, 1, 6, 6)
    before = torch.backends.mkldnn.enabled
    ka = ntk_from_gradients(per_sample_gradients_loop(net, x))
    for choice in (None, True, False):
        kb = ntk_from_gradients(per_sample_gradients(net, x, mkldnn=choice))
        assert np.linalg.norm(ka - kb) <= 1e-5 * np.linalg.norm(ka)
        assert torch.backends.mkldnn.enabled == before


def test_ntk_is_the_batched_forward_not_per_sample(known):
    """BN in train mode couples the samples: forwarding them one at a time gives another NTK,
    and the fast version gives the batched-forward one."""
    net, (images, _) = _network(known, "plain_convnet"), _batch(known, "plain_convnet")
    batched = ntk_from_gradients(per_sample_gradients_loop(net, images))
    single = ntk_from_gradients(per_sample_gradients_loop(net, [images[i : i + 1] for i in range(len(images))]))
    fast = ntk_from_gradients(per_sample_gradients(net, images))
    assert np.linalg.norm(fast - batched) <= 1e-5 * np.linalg.norm(batched)
    assert np.linalg.norm(single - batched) > 0.05 * np.linalg.norm(batched)
    single_kappa = ntk_condition_number(net, [images[i : i + 1] for i in range(len(images))])
    assert _rel(single_kappa.kappa, ntk_condition_number(net, images).kappa) > 0.01
    # several batches: one forward each, rows stacked (the reference with num_batch > 1)
    halves = [images[:4], images[4:]]
    assert torch.allclose(per_sample_gradients(net, halves), per_sample_gradients_loop(net, halves), atol=1e-5)


def test_ntk_leaves_network_unchanged(known):
    net, (images, _) = _network(known, "plain_convnet"), _batch(known, "plain_convnet")
    net.eval()
    before = _snapshot(net)
    ntk_condition_number(net, images)
    ntk_condition_number_loop(net, images)
    linear_regions(net, images)
    _assert_same(before, _snapshot(net))


def test_undefined_kappa_singular_supernet(known):
    """The DARTS search network ends in BN without ReLU: the rows of G sum to zero, the NTK is
    singular for any weights. The reference returned a (negative) number; we report it."""
    torch.manual_seed(0)
    net = SuperNet(channels=2, num_classes=3, layers=3, in_channels=3)
    images = torch.randn(6, 3, 8, 8)
    g = per_sample_gradients(net, images)
    assert g.sum(0).norm() <= 1e-5 * g.norm()
    result = ntk_condition_number(net, images)
    assert math.isnan(result.kappa) and "singular" in result.undefined
    assert known["tenas"]["ntk_kappa"]["supernet_tiny"] < 0  # what TE-NAS's code returned


def test_undefined_kappa_more_samples_than_parameters_and_dead_network():
    torch.manual_seed(0)
    x = torch.randn(5, 2)
    tiny = nn.Linear(2, 1, bias=False)  # 2 weights, 5 samples: rank 2
    result = ntk_condition_number(tiny, x)
    assert math.isnan(result.kappa) and "singular" in result.undefined and result.num_parameters == 2
    loop = ntk_condition_number_loop(tiny, x)
    assert math.isnan(loop.kappa) and loop.undefined
    dead = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    for p in dead.parameters():
        nn.init.zeros_(p)
    result = ntk_condition_number(dead, x)
    assert math.isnan(result.kappa) and "zero" in result.undefined
    # a well-posed case stays defined, and the tolerance can be switched off
    kappa, eig, reason = condition_number(np.diag([1.0, 4.0]))
    assert reason is None and kappa == 4.0 and list(eig) == [1.0, 4.0]
    assert condition_number(np.diag([1e-12, 1.0]), rtol=0)[2] is None
    assert condition_number(np.diag([1e-12, 1.0]))[2] is not None
    assert condition_number(np.diag([-1e-9, 1.0]), rtol=0)[2] is not None


# --------------------------------------------------------------------------- linear regions


def _breakpoint_net() -> nn.Module:
    """1-D input (as N x 1 x 1 x 1) through one ReLU layer of 3 units with breakpoints at
    x = 0 (x > 0), x = 1 (x > 1) and x = 2 (x < 2): 4 linear regions on the line."""
    conv = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 1.0, -1.0]).view(3, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, -1.0, 2.0]))
    return nn.Sequential(conv, nn.ReLU())


def test_linear_regions_known_breakpoints():
    net = _breakpoint_net()
    line = torch.linspace(-3.05, 5.05, 101).view(-1, 1, 1, 1)  # never exactly on a breakpoint
    assert linear_regions(net, line) == 4
    assert linear_regions(net, line[(line > 0.2) & (line < 0.8)].view(-1, 1, 1, 1)) == 1
    assert linear_regions(net, torch.tensor([-1.0, 0.5, 1.5]).view(-1, 1, 1, 1)) == 3
    # batches are pooled; a pattern seen in two batches counts once
    assert linear_regions(net, [line[:50], line[50:], line[:10]]) == 4
    patterns = activation_patterns(net, torch.tensor([-1.0, 0.5, 1.5, 3.0]).view(-1, 1, 1, 1))
    assert patterns.tolist() == [[False, False, True], [True, False, True], [True, True, True], [True, True, False]]


def test_linear_regions_match_tenas(known):
    net = _network(known, "thin_net")
    batches = [_decode(b) for b in known["cases"]["thin_net"]["lr_batches"]]
    reference = known["tenas"]["linear_regions"]["thin_net"]  # float32 sum of 1/multiplicity
    assert linear_regions(net, batches) == round(reference)
    assert abs(reference - round(reference)) < 1e-3


def test_linear_regions_needs_a_relu():
    with pytest.raises(ValueError, match="ReLU"):
        linear_regions(nn.Conv2d(1, 2, 1), torch.randn(4, 1, 3, 3))


def test_count_distinct_and_region_inputs():
    assert count_distinct(torch.tensor([[1, 0, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)) == 2
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, 6, 6, generator=g)
    batches = region_inputs(images, num_batches=3, batch_size=7, generator=g)
    assert [tuple(b.shape) for b in batches] == [(7, 1, 3, 3)] * 3
    crops = {
        images[i, c, t : t + 3, s : s + 3].numpy().tobytes()
        for i in range(5) for c in range(3) for t in range(4) for s in range(4)
    }
    assert all(crop[0].numpy().tobytes() in crops for b in batches for crop in b)
