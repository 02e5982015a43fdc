"""Tests for the metric-sensitivity study (nbutils.studies.metric_sensitivity, TMLR Table 2): the
percentage change, known answers on a linear model, exact zeros where a metric cannot see
the change, undefined values counted, and the summary."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from nbutils.core.data import ImageDataset
from nbutils.studies.metric_sensitivity import (
    COLUMNS,
    architecture_sensitivity,
    metric_sensitivity,
    percentage_change,
    summarise,
)
from nbutils.nas.zero_cost import METRICS

from toys import toy


def toy_dataset(n: int = 16, seed: int = 0, classes: int = 3) -> ImageDataset:
    return toy(n, seed=seed, num_classes=classes, random_labels=True)


def flipped_labels(ds: ImageDataset, indices: np.ndarray) -> ImageDataset:
    """Each label at ``indices`` moved to the next class (always a different class)."""
    return ds.with_replacements(indices, labels=(ds.labels[indices] + 1) % ds.num_classes)


TINY = dict(samples=8, batch_size=8, channels=2, layers=3, seed=0, device="cpu")


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
