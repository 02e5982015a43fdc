"""How much poisoning changes the training-free metrics: the TMLR audit's Table 2.

Section 5.2 of the TMLR paper ("Training-Free Metrics are Robust") asks whether RoBoT and
TE-NAS resist poisoning because their metrics hardly see it. For ``architectures`` random
architectures (100 in the paper) and ``samples`` training points drawn at random (1000),
each metric is computed on the clean points and on the same points of the poisoned dataset
(the same indices, so sample ``i`` of both corresponds), with the SAME network (the same
initial weights), and the change is reported as a percentage of the clean value::

    change_pct = 100 * (poisoned - clean) / |clean|

then summarised per metric as mean +- standard deviation over the architectures. The paper
uses p = 50% poisoning budgets.

As the authors' script (``ztcoalson/RoBoT``, ``darts_space/get_metrics.py``) computes it:

* the networks are RoBoT's (:class:`~nbutils.space.network.EvalNetwork`, C=16, 5 cells, no
  auxiliary head, drop path off), genotypes drawn at random;
* the points are visited in the drawn order in batches of ``batch_size`` (64; the last batch
  holds the remainder), the metrics are computed per batch and averaged over the batches
  (the per-batch sum divided by the number of batches);
* the standard deviation is the population one (``numpy.std``, ddof 0).

The paper's table omits ``synflow`` ("metrics that do not use any data"); it is computed
here too, and its change is exactly 0 (the input is all ones), which is a check of the
procedure. ``jacob_cov`` does not read the labels, so label-flipping changes it by exactly 0.

Departures: a metric undefined on any batch (:class:`~nbutils.nas.zero_cost.MetricUndefined`)
makes that architecture's value undefined, and a clean value of 0 makes the change undefined;
both are counted (``skipped`` in :func:`summarise`), never replaced by a number (the
reference would average NaNs or fail on the division). The inputs are normalised with the
clean data's per-channel statistics (the reference: fixed CIFAR constants).

TE-NAS's columns (``ntk_condition_number``, ``linear_regions``: :data:`TENAS_METRICS`, the
authors' ``ztcoalson/TENAS`` ``sample_metrics.py``) are measured on the same architectures (the
same genotypes, drawn from the same seed) and the same drawn points, on TE-NAS's networks with
TE-NAS's settings (``tenas``, a :class:`~nbutils.nas.tenas.TenasConfig`): the NTK on the first
``repeats`` batches of ``batch_size`` points, the region count on crops of all of them.
:mod:`nbutils.studies.tenas_indicators` says which settings, why, and where this departs from
``sample_metrics.py``. Under label flipping both change by exactly 0 (neither reads labels).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import lazy_loader
import numpy as np
import torch
from torch import nn

from ..core.batches import BatchLoader
from ..core.image_dataset import ImageDataset, channel_stats
from ..space.genotype import random_genotype
from ..space.network import EvalNetwork
from ..core.progress import progress
from ..nas.tenas import TenasConfig
from ..nas.zero_cost import EXTRA_METRICS, METRICS, MetricValues, compute_metrics
from .tenas_indicators import (TENAS_METRICS, TENAS_NETWORKS, TenasInputs, study_switches, tenas_config,
                               tenas_inputs, tenas_networks, tenas_values)

#: imported on first use (lazy_loader): pandas takes ~0.2 s to import, and the CLI imports this
#: module (through the stage steps)
pd = lazy_loader.load("pandas")

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
#: Columns of :func:`metric_sensitivity`'s table, and of :func:`summarise`'s.
COLUMNS = ("architecture", "metric", "clean", "poisoned", "change_pct", "undefined", "genotype")
SUMMARY_COLUMNS = ("metric", "mean", "std", "n", "skipped")

_GENOTYPES, _INIT, _SAMPLES, _TENAS_INIT, _TENAS_THIN, _CROPS = 0, 1, 2, 3, 4, 5


def _seed(seed: int, purpose: int, index: int = 0) -> int:
    return int(np.random.SeedSequence([int(seed), purpose, index]).generate_state(1)[0])


def percentage_change(clean: float, poisoned: float) -> float:
    """``100 * (poisoned - clean) / |clean|``; NaN when either is NaN or ``clean`` is 0."""
    if not (math.isfinite(clean) and math.isfinite(poisoned)) or clean == 0:
        return math.nan
    return 100.0 * (poisoned - clean) / abs(clean)


def mean_over_batches(
    model: nn.Module, batches: Sequence[Batch], metrics: Sequence[str], device: torch.device | str
) -> MetricValues:
    """Each metric's mean over the batches (computed per batch on copies of ``model``, which
    is left unchanged). A metric undefined on any batch is undefined (NaN, reason kept)."""
    sums = {name: 0.0 for name in metrics}
    result = MetricValues()
    for b, (images, labels) in enumerate(batches):
        values = compute_metrics(model, images, labels, metrics=tuple(metrics), device=device)
        for name in metrics:
            if name in values.undefined and name not in result.undefined:
                result.undefined[name] = f"batch {b + 1} of {len(batches)}: {values.undefined[name]}"
            sums[name] += values[name]
    for name in metrics:
        result[name] = math.nan if name in result.undefined else sums[name] / len(batches)
    return result


def architecture_sensitivity(
    model: nn.Module,
    clean_batches: Sequence[Batch],
    poisoned_batches: Sequence[Batch],
    metrics: Sequence[str] = METRICS,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """One network's metrics on the clean and on the poisoned batches, and the percentage
    change: one record per metric (``metric, clean, poisoned, change_pct, undefined``;
    ``undefined`` is the reason, or "" when the change is a number)."""
    if len(clean_batches) != len(poisoned_batches) or not clean_batches:
        raise ValueError(f"clean_batches and poisoned_batches must be equally many (>= 1), got "
                         f"{len(clean_batches)} and {len(poisoned_batches)}")
    clean = mean_over_batches(model, clean_batches, metrics, device)
    poisoned = mean_over_batches(model, poisoned_batches, metrics, device)
    return change_rows(metrics, clean, poisoned)


def tenas_architecture_sensitivity(ntk_network: nn.Module, thin_network: nn.Module, clean: TenasInputs,
                                   poisoned: TenasInputs) -> list[dict]:
    """TE-NAS's two indicators (:func:`~nbutils.studies.tenas_indicators.tenas_values`) of one
    architecture's networks on the clean and on the poisoned inputs, and the percentage change:
    records as :func:`architecture_sensitivity`'s."""
    if len(clean.ntk_batches) != len(poisoned.ntk_batches) or len(clean.crops) != len(poisoned.crops):
        raise ValueError("clean and poisoned must hold equally many NTK batches and crop batches")
    return change_rows(TENAS_METRICS, tenas_values(ntk_network, thin_network, clean),
                       tenas_values(ntk_network, thin_network, poisoned))


def change_rows(metrics: Sequence[str], clean: MetricValues, poisoned: MetricValues) -> list[dict]:
    """One record per metric: ``metric, clean, poisoned, change_pct, undefined`` (the reasons
    the change is undefined, or "")."""
    rows = []
    for name in metrics:
        reasons = [f"{side}: {values.undefined[name]}" for side, values in (("clean", clean), ("poisoned", poisoned))
                   if name in values.undefined]
        change = percentage_change(clean[name], poisoned[name])
        if not reasons and math.isnan(change):
            reasons.append("the clean value is 0")
        rows.append({"metric": name, "clean": clean[name], "poisoned": poisoned[name], "change_pct": change,
                     "undefined": "; ".join(reasons)})
    return rows


def sensitivity_batches(
    clean: ImageDataset,
    poisoned: ImageDataset,
    *,
    samples: int,
    batch_size: int,
    seed: int,
    normalisation: tuple[Sequence[float], Sequence[float]],
    device: torch.device | str,
) -> tuple[list[Batch], list[Batch], np.ndarray]:
    """``samples`` distinct indices drawn at random (seeded), in drawn order, and the clean and
    poisoned batches of those samples (consecutive chunks of ``batch_size``). Returns
    ``(clean_batches, poisoned_batches, indices)``."""
    indices = np.random.default_rng(_seed(seed, _SAMPLES)).choice(len(clean), size=samples, replace=False)
    mean, std = normalisation

    def batches(ds: ImageDataset) -> list[Batch]:
        loader = BatchLoader(ds.subset(indices), batch_size, shuffle=False, seed=seed, mean=mean, std=std,
                             device=device)
        return list(loader)

    return batches(clean), batches(poisoned), indices


def _checked_arguments(clean: ImageDataset, poisoned: ImageDataset, metrics: Sequence[str] | str, *,
                       architectures: int, samples: int, batch_size: int, channels: int, layers: int,
                       seed: int) -> tuple[str, ...]:
    """:func:`metric_sensitivity`'s arguments checked before any compute; returns ``metrics`` as a tuple."""
    for name, value, minimum in (("architectures", architectures, 1), ("samples", samples, 2),
                                 ("batch_size", batch_size, 2), ("channels", channels, 1), ("layers", layers, 3)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    allowed = METRICS + EXTRA_METRICS + TENAS_METRICS
    if not metrics or any(m not in allowed for m in metrics) or len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics must be distinct names from {', '.join(allowed)}, got {metrics!r}")
    if len(clean) != len(poisoned) or clean.classes != poisoned.classes or clean.shape_chw != poisoned.shape_chw:
        raise ValueError(f"poisoned must be clean with a poison set applied (same length, classes and image shape); "
                         f"got clean {clean!r} and poisoned {poisoned!r}")
    if samples > len(clean):
        raise ValueError(f"samples must be at most the dataset's size ({len(clean)}), got {samples}")
    if samples % batch_size == 1 and "jacob_cov" in metrics:
        raise ValueError(f"samples ({samples}) and batch_size ({batch_size}) leave a last batch of one sample, "
                         "on which jacob_cov is undefined; change either")
    return metrics


def _normalisation(clean: ImageDataset, normalisation) -> tuple[Sequence[float], Sequence[float]]:
    """The (mean, std) given, checked to hold one value per channel, else the clean data's."""
    mean, std = normalisation or channel_stats(clean)
    if len(mean) != clean.in_channels or len(std) != clean.in_channels:
        raise ValueError(f"normalisation must give one mean and one std per channel ({clean.in_channels}), "
                         f"got {normalisation!r}")
    return mean, std


def _tenas_rows(a: int, genotype, config: TenasConfig, tenas_network: str, clean: ImageDataset,
                inputs: tuple[TenasInputs, TenasInputs], metrics: Sequence[str], *, seed: int,
                device: torch.device | str) -> list[dict]:
    """Architecture ``a``'s rows of TE-NAS's ``metrics``, on the networks ``tenas_network`` says."""
    ntk_network, thin_network = tenas_networks(
        study_switches(genotype, config, tenas_network), config, num_classes=clean.num_classes,
        in_channels=clean.in_channels, ntk_seed=_seed(seed, _TENAS_INIT, a),
        thin_seed=_seed(seed, _TENAS_THIN, a), device=device)
    label = genotype.to_json() if tenas_network == "architecture" else ""   # "": measured on the supernet
    changes = tenas_architecture_sensitivity(ntk_network, thin_network, *inputs)
    return [{"architecture": a, **row, "genotype": label} for row in changes if row["metric"] in metrics]


def _log_what_changed(clean: ImageDataset, poisoned: ImageDataset, indices: np.ndarray) -> None:
    changed = int((clean.labels[indices] != poisoned.labels[indices]).sum())
    changed_images = int((clean.images[indices] != poisoned.images[indices]).flatten(1).any(1).sum())
    log.info("metric sensitivity: %d samples, %d with a changed label, %d with a changed image", len(indices),
             changed, changed_images)


def metric_sensitivity(
    clean: ImageDataset,
    poisoned: ImageDataset,
    *,
    architectures: int = 100,
    samples: int = 1000,
    batch_size: int = 64,
    channels: int = 16,
    layers: int = 5,
    metrics: Sequence[str] = METRICS,
    tenas: TenasConfig | dict | None = None,
    tenas_network: str = "architecture",
    seed: int,
    device: torch.device | str,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> pd.DataFrame:
    """The change of each metric under poisoning, per random architecture (module docstring).

    ``poisoned`` must be ``clean`` with a poison set applied (same length, classes, image
    shape: sample ``i`` of both is the same point). ``normalisation`` is the per-channel (mean,
    std) of the inputs, by default the clean dataset's. ``metrics``: RoBoT's (zero-cost
    metrics, on RoBoT's network: ``batch_size``, ``channels``, ``layers``) and/or TE-NAS's
    (:data:`TENAS_METRICS`, with ``tenas``'s settings, by default the reference's, on the
    network ``tenas_network`` says: :mod:`nbutils.studies.tenas_indicators`). Returns one row
    per architecture x metric with the columns :data:`COLUMNS` (``genotype`` as JSON, "" for
    TE-NAS's rows measured on the supernet); summarise it with :func:`summarise`.
    """
    metrics = _checked_arguments(clean, poisoned, metrics, architectures=architectures, samples=samples,
                                 batch_size=batch_size, channels=channels, layers=layers, seed=seed)
    mean, std = _normalisation(clean, normalisation)
    robot_metrics = tuple(m for m in metrics if m not in TENAS_METRICS)
    measure_tenas = any(m in TENAS_METRICS for m in metrics)
    config = tenas_config(tenas)
    if tenas_network not in TENAS_NETWORKS:
        raise ValueError(f"tenas_network must be one of {', '.join(TENAS_NETWORKS)}, got {tenas_network!r}")

    clean_batches, poisoned_batches, indices = sensitivity_batches(
        clean, poisoned, samples=samples, batch_size=batch_size, seed=seed, normalisation=(mean, std), device=device)
    _log_what_changed(clean, poisoned, indices)
    if measure_tenas:
        clean_inputs, poisoned_inputs = (
            tenas_inputs(ds.subset(indices), config, crop_seed=_seed(seed, _CROPS), normalisation=(mean, std),
                         device=device) for ds in (clean, poisoned))

    rng = np.random.default_rng(_seed(seed, _GENOTYPES))
    rows = []
    for a in progress(range(architectures), desc="metric sensitivity: architectures"):
        genotype = random_genotype(rng)
        if robot_metrics:
            torch.manual_seed(_seed(seed, _INIT, a))
            model = EvalNetwork(genotype, channels=channels, num_classes=clean.num_classes, layers=layers,
                                auxiliary=False, in_channels=clean.in_channels, input_size=clean.image_size)
            rows += [{"architecture": a, **row, "genotype": genotype.to_json()} for row in
                     architecture_sensitivity(model, clean_batches, poisoned_batches, robot_metrics, device)]
        if measure_tenas:
            rows += _tenas_rows(a, genotype, config, tenas_network, clean, (clean_inputs, poisoned_inputs),
                                metrics, seed=seed, device=device)
    order = {m: i for i, m in enumerate(metrics)}
    rows.sort(key=lambda r: (r["architecture"], order[r["metric"]]))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per metric (in the table's order): ``mean`` and ``std`` (population, ddof 0) of the
    defined percentage changes, their number ``n``, and ``skipped``, the architectures whose
    change is undefined. ``mean``/``std`` are NaN when no change is defined."""
    missing = {"metric", "change_pct"} - set(table.columns)
    if missing:
        raise ValueError(f"table must have the columns metric and change_pct, missing {sorted(missing)}")
    out = []
    for metric in pd.unique(table["metric"]):
        changes = table.loc[table["metric"] == metric, "change_pct"].to_numpy(dtype=np.float64)
        defined = changes[np.isfinite(changes)]
        out.append({
            "metric": metric,
            "mean": float(defined.mean()) if len(defined) else math.nan,
            "std": float(defined.std()) if len(defined) else math.nan,
            "n": int(len(defined)),
            "skipped": int(len(changes) - len(defined)),
        })
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))
