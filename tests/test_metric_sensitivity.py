"""Tests for the metric-sensitivity study (nbutils.studies.metric_sensitivity, TMLR Table 2): the
percentage change, known answers on a linear model, exact zeros where a metric cannot see
the change, undefined values counted, and the summary; TE-NAS's kappa and R (known answers on
tiny networks, an independent Jacobian for the study's TE-NAS networks); and which poison set
each algorithm's study reads in the stage graph."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pathlib import Path

from nbutils.core.image_dataset import ImageDataset, channel_stats
from nbutils.nas.ntk import activation_patterns
from nbutils.nas.tenas_network import initial_switches
from nbutils.nas.zero_cost import METRICS
from nbutils.pipeline import params
from nbutils.pipeline.stages import expand
from nbutils.space.genotype import PUBLISHED, Genotype, random_genotype
from nbutils.studies.metric_sensitivity import (
    _CROPS,
    _SAMPLES,
    _TENAS_INIT,
    _TENAS_THIN,
    COLUMNS,
    _seed,
    architecture_sensitivity,
    metric_sensitivity,
    percentage_change,
    summarise,
    tenas_architecture_sensitivity,
)
from nbutils.studies.tenas_indicators import (
    TENAS_METRICS,
    TENAS_SETTINGS,
    TenasInputs,
    architecture_switches,
    study_switches,
    tenas_config,
    tenas_inputs,
    tenas_networks,
    tenas_values,
)

from toys import toy


def toy_dataset(n: int = 16, seed: int = 0, classes: int = 3) -> ImageDataset:
    return toy(n, seed=seed, num_classes=classes, random_labels=True)


def flipped_labels(ds: ImageDataset, indices: np.ndarray) -> ImageDataset:
    """Each label at ``indices`` moved to the next class (always a different class)."""
    return ds.with_replacements(indices, labels=(ds.labels[indices] + 1) % ds.num_classes)


TINY = dict(samples=8, batch_size=8, channels=2, layers=3, seed=0, device="cpu")
TINY_ATTACKS = Path(__file__).resolve().parent / "presets" / "tiny_attacks"


# --------------------------------------------------------------------------- the arithmetic


def test_percentage_change_is_relative_to_the_absolute_clean_value():
    assert percentage_change(2.0, 3.0) == 50.0
    assert percentage_change(-2.0, -3.0) == -50.0
    assert percentage_change(-4.0, -3.0) == 25.0
    assert math.isnan(percentage_change(0.0, 1.0))
    assert math.isnan(percentage_change(math.nan, 1.0))


def linear_metrics(weight: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """grad_norm and snip of ``x -> W x`` (no bias) under the mean cross-entropy, by hand:
    dL/dW = (softmax(XW^T) - onehot(y))^T X / n."""
    logits = x @ weight.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    grad = p.T @ x / len(y)
    return float(np.linalg.norm(grad)), float(np.abs(weight * grad).sum())


def test_known_answer_on_a_linear_model_with_flipped_labels_and_batch_averaging():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3, 8))
    x = [rng.normal(size=(2, 8)) for _ in range(2)]                  # two batches of two samples
    y_clean = [np.array([0, 1]), np.array([2, 2])]
    y_poisoned = [np.array([1, 1]), np.array([2, 0])]
    linear = nn.Linear(8, 3, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
    model = nn.Sequential(nn.Flatten(), linear)   # images 2 x 2 x 2, flattened row-major

    def batches(labels):
        return [(torch.from_numpy(xb).reshape(-1, 2, 2, 2), torch.from_numpy(yb)) for xb, yb in zip(x, labels)]

    rows = architecture_sensitivity(model, batches(y_clean), batches(y_poisoned), ("grad_norm", "snip"))
    clean = np.mean([linear_metrics(weight, xb, yb) for xb, yb in zip(x, y_clean)], axis=0)
    poisoned = np.mean([linear_metrics(weight, xb, yb) for xb, yb in zip(x, y_poisoned)], axis=0)
    for row, c, p in zip(rows, clean, poisoned):
        assert row["undefined"] == ""
        assert row["clean"] == pytest.approx(c, rel=1e-10)
        assert row["poisoned"] == pytest.approx(p, rel=1e-10)
        assert row["change_pct"] == pytest.approx(100 * (p - c) / abs(c), rel=1e-8)
        assert row["change_pct"] != 0.0


def test_undefined_values_are_reported_and_counted_not_replaced():
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 3, bias=False))
    nn.init.zeros_(model[1].weight)   # input-Jacobian constant (zero): jacob_cov undefined; snip = |0 * g| = 0
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randn(4, 2, 2, 2, generator=g), torch.tensor([0, 1, 2, 0]))]
    poisoned = [(batch[0][0], torch.tensor([1, 1, 2, 0]))]
    rows = {r["metric"]: r for r in architecture_sensitivity(model, batch, poisoned, ("grad_norm", "snip", "jacob_cov"))}
    assert rows["grad_norm"]["undefined"] == "" and math.isfinite(rows["grad_norm"]["change_pct"])
    assert rows["snip"]["clean"] == 0.0 and rows["snip"]["undefined"] == "the clean value is 0"
    assert math.isnan(rows["jacob_cov"]["clean"]) and "clean: batch 1 of 1" in rows["jacob_cov"]["undefined"]
    assert math.isnan(rows["snip"]["change_pct"]) and math.isnan(rows["jacob_cov"]["change_pct"])

    summary = summarise(pd.DataFrame([{"architecture": 0, **r} for r in rows.values()])).set_index("metric")
    assert summary.loc["grad_norm", ["n", "skipped"]].tolist() == [1, 0]
    assert summary.loc["snip", ["n", "skipped"]].tolist() == [0, 1]
    assert math.isnan(summary.loc["jacob_cov", "mean"])


def test_summarise_gives_mean_population_std_count_and_skipped_per_metric():
    table = pd.DataFrame({
        "metric": ["b", "a", "b", "a", "a", "b"],
        "change_pct": [2.0, 1.0, 2.0, 3.0, np.nan, 2.0],
    })
    summary = summarise(table)
    assert summary["metric"].tolist() == ["b", "a"]
    a = summary.set_index("metric").loc["a"]
    assert (a["mean"], a["std"], a["n"], a["skipped"]) == (2.0, 1.0, 2, 1)
    b = summary.set_index("metric").loc["b"]
    assert (b["mean"], b["std"], b["n"], b["skipped"]) == (2.0, 0.0, 3, 0)


# --------------------------------------------------------------------------- the study on DARTS networks


def test_identical_clean_and_poisoned_data_change_nothing_exactly():
    clean = toy_dataset()
    same = clean.with_replacements([0], labels=clean.labels[:1])   # a distinct but equal dataset
    table = metric_sensitivity(clean, same, architectures=2, **TINY)
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == 2 * len(METRICS)
    assert (table["undefined"] == "").all()
    assert (table["change_pct"] == 0.0).all()
    assert table.groupby("architecture")["genotype"].nunique().tolist() == [1, 1]
    assert table["genotype"].nunique() == 2


def test_label_flips_change_the_label_metrics_but_not_synflow_or_jacob_cov():
    clean = toy_dataset()
    poisoned = flipped_labels(clean, np.arange(0, 16, 2))   # half the labels, as the paper's p = 50%
    table = metric_sensitivity(clean, poisoned, architectures=2, **TINY).set_index(["metric", "architecture"])
    for metric in ("synflow", "jacob_cov"):          # synflow reads no data, jacob_cov no labels
        assert (table.loc[metric, "change_pct"] == 0.0).all()
    for metric in ("grad_norm", "snip", "grasp", "fisher"):
        assert (table.loc[metric, "change_pct"].abs() > 0).all()
    summary = summarise(table.reset_index()).set_index("metric")
    assert summary["n"].tolist() == [2] * len(METRICS)


def test_perturbed_images_change_jacob_cov_but_not_synflow():
    clean = toy_dataset()
    noisy = clean.images[:8].clone()
    noisy[:, :, :4] = 255 - noisy[:, :, :4]
    poisoned = clean.with_replacements(np.arange(8), images=noisy)
    table = metric_sensitivity(clean, poisoned, architectures=1, metrics=("synflow", "jacob_cov"),
                               **{**TINY, "samples": 16}).set_index("metric")
    assert table.loc["synflow", "change_pct"] == 0.0
    assert table.loc["jacob_cov", "change_pct"] != 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(architectures=0), "architectures"),
    (dict(samples=17), "samples"),
    (dict(samples=9, batch_size=8), "jacob_cov"),
    (dict(metrics=("snip", "nope")), "metrics"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments_are_rejected_before_any_compute(kwargs, match):
    clean = toy_dataset()
    with pytest.raises(ValueError, match=match):
        metric_sensitivity(clean, clean, **{**TINY, **kwargs})


def test_poisoned_must_correspond_to_clean():
    with pytest.raises(ValueError, match="poisoned must be clean"):
        metric_sensitivity(toy_dataset(16), toy_dataset(15), architectures=1, **TINY)


# --------------------------------------------------------------------------- TE-NAS's kappa and R (Table 2's first columns)


def test_tenas_indicators_known_answers_and_their_percentage_change():
    """kappa of ``x -> W x`` is that of ``X X^T`` (the summed logits' gradient w.r.t. W is one
    copy of x per class, so NTK = K X X^T); R of a 1x1 convolution + ReLU is the number of
    distinct sign patterns of ``W x`` over the pixels, counted here by brute force."""
    linear = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False)).double()
    x_clean = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]], dtype=torch.float64)   # X X^T = diag(1, 4)
    x_poisoned = torch.tensor([[1.0, 0, 0, 0], [0, 3.0, 0, 0]], dtype=torch.float64)   # diag(1, 9)
    conv = nn.Conv2d(1, 3, 1, bias=False)
    thin = nn.Sequential(conv, nn.ReLU())
    g = torch.Generator().manual_seed(0)
    crops_clean = torch.randn(40, 1, 2, 2, generator=g)
    crops_poisoned = crops_clean.clone()
    crops_poisoned[:20] = -crops_poisoned[:20]

    def brute_force_regions(crops: torch.Tensor) -> int:
        w = conv.weight.detach().numpy().reshape(3)
        pixels = crops.numpy().reshape(len(crops), 4)                       # 2x2 pixels per crop
        patterns = {tuple((w[:, None] * pixels[i][None, :] > 0).T.ravel()) for i in range(len(crops))}
        return len(patterns)

    def inputs(x, crops):
        return TenasInputs([x.reshape(2, 1, 2, 2)], [crops[:25], crops[25:]])

    rows = {r["metric"]: r for r in tenas_architecture_sensitivity(linear, thin, inputs(x_clean, crops_clean),
                                                                     inputs(x_poisoned, crops_poisoned))}
    kappa = rows["ntk_condition_number"]
    assert (kappa["clean"], kappa["poisoned"]) == (pytest.approx(4.0), pytest.approx(9.0))
    assert kappa["change_pct"] == pytest.approx(125.0) and kappa["undefined"] == ""
    regions = rows["linear_regions"]
    clean_r, poisoned_r = brute_force_regions(crops_clean), brute_force_regions(crops_poisoned)
    assert (regions["clean"], regions["poisoned"]) == (clean_r, poisoned_r)
    assert regions["change_pct"] == pytest.approx(100 * (poisoned_r - clean_r) / clean_r)
    assert 1 < clean_r < 40


def test_kappa_averages_the_ntk_batches_and_reports_a_singular_one():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False)).double()
    batches = [torch.tensor([[1.0, 0], [0, 2.0]]), torch.tensor([[1.0, 0], [0, 4.0]])]   # kappa 4 and 16
    crops = [torch.zeros(2, 1, 1, 1)]
    thin = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())
    values = tenas_values(linear, thin, TenasInputs([b.double().reshape(2, 1, 1, 2) for b in batches], crops))
    assert values["ntk_condition_number"] == pytest.approx(10.0) and not values.undefined
    singular = [batches[0], torch.tensor([[1.0, 1.0], [2.0, 2.0]])]                   # rank 1
    values = tenas_values(linear, thin, TenasInputs([b.double().reshape(2, 1, 1, 2) for b in singular], crops))
    assert math.isnan(values["ntk_condition_number"])
    assert values.undefined["ntk_condition_number"].startswith("batch 2 of 2: the NTK is")


TENAS_TINY = {"batch_size": 4, "repeats": 2, "region_batches": 2, "region_batch_size": 30}


def independent_kappa(network: nn.Module, batch: torch.Tensor) -> float:
    """kappa by another route than nbutils.nas.ntk: the Jacobian of the per-sample summed logits
    w.r.t. every 'weight' parameter, by torch.func.jacrev on a copy in training mode."""
    import copy

    from torch.func import functional_call, jacrev

    net = copy.deepcopy(network).train()
    for m in net.modules():   # batch statistics either way; no running statistics to update under jacrev
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
    params = {n: p.detach() for n, p in net.named_parameters()}
    names = [n for n in params if "weight" in n]

    def summed(weights):
        return functional_call(net, {**params, **weights}, (batch,)).sum(1)

    jac = jacrev(summed)({n: params[n] for n in names})
    rows = torch.cat([jac[n].reshape(batch.shape[0], -1) for n in names], 1).double()
    eig = np.linalg.eigvalsh((rows @ rows.T).numpy())
    return float(eig[-1] / eig[0])


def test_the_study_measures_tenas_networks_of_the_drawn_architectures_on_the_drawn_points():
    clean = toy_dataset(24)
    poisoned = clean.with_replacements(np.arange(12), images=255 - clean.images[:12])
    table = metric_sensitivity(clean, poisoned, architectures=2, samples=12, metrics=("ntk_condition_number",
                               "linear_regions", "grad_norm"), tenas=TENAS_TINY, seed=3, device="cpu")
    assert table.metric.tolist() == ["ntk_condition_number", "linear_regions", "grad_norm"] * 2
    # the same architectures for both algorithms' metrics
    assert (table.groupby("architecture").genotype.nunique() == 1).all() and table.genotype.nunique() == 2
    # rebuild architecture 1's TE-NAS network and the drawn points, compute kappa independently
    config = tenas_config(TENAS_TINY)
    genotype = Genotype.from_json(table.genotype.iloc[-1])
    ntk_network, thin = tenas_networks(architecture_switches(genotype), config, num_classes=3, in_channels=1,
                                       ntk_seed=_seed(3, _TENAS_INIT, 1), thin_seed=_seed(3, _TENAS_THIN, 1),
                                       device="cpu")
    indices = np.random.default_rng(_seed(3, _SAMPLES)).choice(24, size=12, replace=False)
    for ds, side in ((clean, "clean"), (poisoned, "poisoned")):
        inputs = tenas_inputs(ds.subset(indices), config, crop_seed=_seed(3, _CROPS),
                              normalisation=channel_stats(clean), device="cpu")
        assert [len(b) for b in inputs.ntk_batches] == [4, 4] and [len(c) for c in inputs.crops] == [30, 30]
        kappa = np.mean([independent_kappa(ntk_network, b) for b in inputs.ntk_batches])
        row = table[(table.architecture == 1) & (table.metric == "ntk_condition_number")].iloc[0]
        assert row[side] == pytest.approx(kappa, rel=1e-4)
        patterns = activation_patterns(thin, inputs.crops).numpy()
        row = table[(table.architecture == 1) & (table.metric == "linear_regions")].iloc[0]
        assert row[side] == len(np.unique(patterns, axis=0))
    assert (table.loc[table.metric == "ntk_condition_number", "change_pct"].abs() > 0).all()


def test_label_flips_change_neither_kappa_nor_regions():
    """Neither indicator reads labels, and both sides see the same points and the same crops."""
    clean = toy_dataset(24)
    poisoned = flipped_labels(clean, np.arange(0, 24, 2))
    table = metric_sensitivity(clean, poisoned, architectures=2, samples=16, metrics=("ntk_condition_number",
                               "linear_regions"), tenas=TENAS_TINY, seed=0, device="cpu")
    assert (table.change_pct == 0.0).all() and (table.undefined == "").all()


def test_the_supernet_measures_every_operation_whatever_the_architecture():
    config = tenas_config({"operations": ["skip_connect", "sep_conv_3x3"]})
    genotype = random_genotype(np.random.default_rng(0))
    assert study_switches(genotype, config, "supernet") == initial_switches(("skip_connect", "sep_conv_3x3"))
    clean = toy_dataset(16)
    table = metric_sensitivity(clean, clean, architectures=1, samples=8, metrics=("linear_regions",),
                               tenas={**TENAS_TINY, "operations": ["skip_connect"]}, tenas_network="supernet",
                               seed=0, device="cpu")
    assert table.genotype.tolist() == [""] and table.change_pct.tolist() == [0.0]


def test_an_architecture_keeps_its_own_operation_on_its_own_edges():
    switches = architecture_switches(PUBLISHED["DARTS_V2"])
    # DARTS_V2's normal cell: node 2 reads 0, 1; node 3 reads 0, 1; node 4 reads 1, 0; node 5 reads 0, 2
    alive = {e: ops for e, ops in enumerate(switches["normal"]) if ops}
    assert alive == {0: ("sep_conv_3x3",), 1: ("sep_conv_3x3",), 2: ("sep_conv_3x3",), 3: ("sep_conv_3x3",),
                     5: ("skip_connect",), 6: ("sep_conv_3x3",), 9: ("skip_connect",), 11: ("dil_conv_3x3",)}
    twice = Genotype(normal=[("skip_connect", 0), ("sep_conv_3x3", 0)] + list(PUBLISHED["DARTS_V2"].normal[2:]),
                     reduce=PUBLISHED["DARTS_V2"].reduce)
    with pytest.raises(ValueError, match="reads state 0 twice"):
        architecture_switches(twice)


@pytest.mark.parametrize("kwargs, match", [
    (dict(samples=7), "repeats x batch_size"),
    (dict(tenas_network="thin"), "tenas_network"),
])
def test_bad_tenas_arguments_are_rejected_before_any_network(kwargs, match):
    clean = toy_dataset()
    with pytest.raises(ValueError, match=match):
        metric_sensitivity(clean, clean, **{**TINY, "metrics": TENAS_METRICS, "tenas": TENAS_TINY, **kwargs})


# --------------------------------------------------------------------------- the stages: which poisons each study reads


def grid_preset(gc_algorithms, nas_algorithms=("darts", "tenas", "robot"), **sensitivity):
    base = params.load_preset(TINY_ATTACKS)
    grid = {**base.grid.model_dump(), "nas_algorithms": list(nas_algorithms),
            "attacks": [{"name": "none"}, {"name": "rlf", "budgets": [0.25]},
                        {"name": "gc", "budgets": [0.25], "algorithms": list(gc_algorithms)}]}
    return base.model_copy(update={
        "grid": params.validate("grid", grid),
        "metric_sensitivity": params.validate("metric_sensitivity",
                                              {**base.metric_sensitivity.model_dump(), **sensitivity})})


def sensitivity_stages(preset):
    stages = expand(preset)
    return {(s.meta["attack"], s.meta["metrics_of"]): s for s in stages if s.kind == "sensitivity"}, stages[-1]


def test_each_algorithms_metrics_read_the_gc_poisons_crafted_against_it():
    studies, report = sensitivity_stages(grid_preset(["darts", "tenas", "robot"]))
    assert set(studies) == {("rlf", "tenas"), ("rlf", "robot"), ("gc", "tenas"), ("gc", "robot")}
    assert studies[("gc", "tenas")].inputs["poison"].meta["target"] == "tenas"
    assert studies[("gc", "robot")].inputs["poison"].meta["target"] == "robot"
    # label flipping: one poison set for both
    assert studies[("rlf", "tenas")].inputs["poison"] is studies[("rlf", "robot")].inputs["poison"]
    assert "sensitivity_not_run" not in report.spec
    assert {(c["attack"], c["metrics_of"]) for c in report.spec["sensitivity"]} == set(studies)


def test_gc_not_crafted_against_an_algorithm_leaves_its_cell_not_run_with_the_reason():
    studies, report = sensitivity_stages(grid_preset(["darts", "robot"]))
    assert ("gc", "tenas") not in studies
    assert studies[("gc", "robot")].inputs["poison"].meta["target"] == "robot"
    (missing,) = report.spec["sensitivity_not_run"]
    assert (missing["attack"], missing["budget"], missing["metrics_of"]) == ("gc", 0.25, "tenas")
    assert "no gradient-canceling poisons against TE-NAS" in missing["reason"]
    studies, report = sensitivity_stages(grid_preset(["darts"], nas_algorithms=("darts",), algorithms=["robot"]))
    assert set(studies) == {("rlf", "robot")}
    assert [m["metrics_of"] for m in report.spec["sensitivity_not_run"]] == ["robot"]
    assert "nas_algorithms does not search it" in report.spec["sensitivity_not_run"][0]["reason"]


def test_robots_study_keeps_its_spec_and_tenas_carries_the_searchs_settings():
    preset = grid_preset(["darts", "tenas", "robot"])
    studies, _ = sensitivity_stages(preset)
    robot = studies[("rlf", "robot")].spec
    assert set(robot["config"]) == {"architectures", "samples", "batch_size", "channels", "layers", "seed"}
    tenas = studies[("rlf", "tenas")].spec["config"]
    assert tenas["metrics"] == list(TENAS_METRICS) and tenas["tenas_network"] == "architecture"
    assert tenas["tenas"] == {name: getattr(preset.search.tenas, name) for name in TENAS_SETTINGS}
    supernet, _ = sensitivity_stages(grid_preset(["darts"], tenas_network="supernet"))
    assert supernet[("rlf", "tenas")].spec["config"]["tenas"]["operations"] == list(preset.search.tenas.operations)


def test_too_few_samples_for_tenas_batches_is_refused_at_validation():
    base = params.load_preset(TINY_ATTACKS)
    values = {**base.model_dump(), "metric_sensitivity": {**base.metric_sensitivity.model_dump(), "samples": 7}}
    with pytest.raises(ValueError, match="repeats x batch_size = 2 x 4"):   # tiny_attacks' search.yaml
        params.Preset.model_validate(values)
