"""TE-NAS's two indicators of one architecture, for the metric-sensitivity study: the TE-NAS
columns of TMLR Table 2 (the NTK condition number ``kappa`` and the linear-region count ``R``).

The indicators are :mod:`nbutils.nas.ntk`'s (:func:`~nbutils.nas.ntk.ntk_condition_number`,
:func:`~nbutils.nas.ntk.linear_regions`, :func:`~nbutils.nas.ntk.region_inputs`), measured on
TE-NAS's networks (:class:`~nbutils.nas.tenas_network.TenasNetwork`) with TE-NAS's settings, read
from a :class:`~nbutils.nas.tenas.TenasConfig` (the preset's ``search.yaml`` ``tenas:`` section,
so the study measures the indicators exactly as the preset's TE-NAS search computes them;
:data:`TENAS_SETTINGS` are the fields used):

* ``kappa``: the NTK network (``channels`` C=1, ``cells`` 2, stem with ``stem_multiplier`` 1,
  affine BN, BN + ReLU before pooling) in training mode, on ``repeats`` (3) batches of
  ``batch_size`` (14) images, the mean of the per-batch condition numbers: TE-NAS's search
  repeats the measurement 3 times on batches of 14 and averages (``prune_tenas.py --repeat 3``);
  the authors' ``sample_metrics.py`` likewise averages per-batch values (its batches: 16).
* ``R``: the thin network (no stem, one input channel) on ``region_batches`` (3) batches of
  ``region_batch_size`` (1000) random ``region_crop`` x ``region_crop`` (3x3) crops of one
  random channel of the images, distinct activation patterns over all of them (TE-NAS's
  ``Linear_Region_Collector`` as the search uses it).
* ``image_size``: the images are resized to it for both, as the search does.

Both networks keep PyTorch's default initialisation, as in the reference (its launcher's
``--init kaiming_normal`` matches no branch of its ``init_model``), each seeded; the clean and
the poisoned measurements use the same networks.

The network is the architecture's (``network="architecture"``, the default): the TE-NAS
supernet with only the architecture's operations alive, one per kept edge (weight 1), the
form TE-NAS's pruning ends in, so "the same random architectures" of the paper's text are
measured by both algorithms' metrics. ``network="supernet"`` measures what
the authors' ``sample_metrics.py`` measures: the full supernet (every operation of
``operations`` alive on every edge, weighted 1/k), freshly initialised for each "architecture".

Where the same data serve both sides: the NTK batches are the first ``repeats * batch_size``
of the study's drawn points in drawn order, without augmentation (as ``sample_metrics.py``:
its loaders use the test transform), so sample ``i`` of a clean batch and of the poisoned
batch are the same point; the crops are drawn once (the same images, positions and channels)
and cut from the clean and from the poisoned images. A departure from ``sample_metrics.py``,
which draws fresh random crops for every dataset: its ``R`` change under label flipping
(0.13 +- 9.45%) is the noise of redrawing the crops, here exactly 0, as the change of
``kappa`` under label flipping is in both (labels are not read). Another: the script measures
``kappa`` on 100 drawn points in batches of 16 (``--batch_size 16``, its ``--repeat`` unused)
and ``R`` on one crop of each of those 100 points (its counter, sized for 1000 crops, also
counts its 900 unfilled all-zero rows as one region); here both use TE-NAS's search settings,
so the change measured is that of the values TE-NAS's search ranks by.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.batches import BatchLoader
from ..core.image_dataset import ImageDataset, resized
from ..nas.ntk import linear_regions, ntk_condition_number, region_inputs
from ..nas.tenas import TenasConfig
from ..nas.tenas_network import CELL_TYPES, Switches, TenasNetwork, check_switches, initial_switches
from ..nas.zero_cost import MetricValues
from ..space.genotype import NUM_EDGES, Genotype

#: the two indicators, as the study's tables name them
TENAS_METRICS: tuple[str, ...] = ("ntk_condition_number", "linear_regions")
#: the fields of :class:`~nbutils.nas.tenas.TenasConfig` the indicators read (``operations``:
#: the supernet's, for ``network="supernet"`` only)
TENAS_SETTINGS: tuple[str, ...] = ("batch_size", "channels", "cells", "stem_multiplier", "repeats",
                                   "region_batches", "region_batch_size", "region_crop", "image_size")
#: which network an "architecture" of the study is measured on (module docstring)
TENAS_NETWORKS: tuple[str, ...] = ("architecture", "supernet")


def tenas_config(settings: TenasConfig | Mapping | None) -> TenasConfig:
    """A :class:`TenasConfig` from a config, a mapping of its fields (a stage's spec) or None
    (the reference's settings)."""
    if settings is None:
        return TenasConfig()
    if isinstance(settings, TenasConfig):
        return settings
    return TenasConfig(**dict(settings))


def architecture_switches(genotype: Genotype) -> Switches:
    """The switches of TE-NAS's supernet with only ``genotype``'s operations alive: on each
    edge ``(node, input)`` of the genotype its operation, every other edge removed."""
    switches = {}
    for kind in CELL_TYPES:
        edges: list[tuple[str, ...]] = [()] * NUM_EDGES
        gene = genotype.normal if kind == "normal" else genotype.reduce
        for k, (op, src) in enumerate(gene):
            node = k // 2
            edge = sum(2 + i for i in range(node)) + src
            if edges[edge]:
                raise ValueError(f"genotype.{kind}: node {node + 2} reads state {src} twice; TE-NAS's network holds "
                                 "one operation per edge of an architecture")
            edges[edge] = (op,)
        switches[kind] = edges
    return check_switches(switches)


@dataclass(frozen=True)
class TenasInputs:
    """What the indicators read from one side (clean or poisoned): the NTK batches (normalised,
    ``repeats`` x ``batch_size`` x C x H x W) and the region count's crops."""

    ntk_batches: list[torch.Tensor]
    crops: list[torch.Tensor]


def tenas_inputs(points: ImageDataset, config: TenasConfig, *, crop_seed: int,
                 normalisation: tuple[Sequence[float], Sequence[float]], device: torch.device | str) -> TenasInputs:
    """The indicators' inputs from ``points`` (the study's drawn points, in drawn order): the NTK
    batches are its first ``repeats * batch_size`` points in consecutive chunks, the crops are
    drawn with a generator seeded by ``crop_seed`` (the same seed gives the same images,
    positions and channels for two datasets of the same size)."""
    needed = config.repeats * config.batch_size
    if len(points) < needed:
        raise ValueError(f"TE-NAS's kappa needs repeats x batch_size = {config.repeats} x {config.batch_size} = "
                         f"{needed} points, got {len(points)}")
    if config.image_size is not None:
        points = resized(points, config.image_size)
    _, h, w = points.shape_chw
    if min(h, w) < max(config.region_crop, 2 ** config.cells):
        raise ValueError(f"images of {h}x{w} are too small for region_crop={config.region_crop} and "
                         f"{config.cells} cells (each reduction halves the side)")
    mean, std = normalisation
    loader = BatchLoader(points.subset(np.arange(needed)), config.batch_size, shuffle=False, seed=0, mean=mean,
                         std=std, device=device)
    ntk_batches = [images for images, _ in loader]
    crops = region_inputs(points.images, num_batches=config.region_batches, batch_size=config.region_batch_size,
                          crop=config.region_crop, generator=torch.Generator().manual_seed(int(crop_seed)),
                          mean=mean, std=std)
    return TenasInputs(ntk_batches, [c.to(device) for c in crops])


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """PyTorch's global generator seeded with ``seed`` for the block, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def tenas_networks(switches: Switches, config: TenasConfig, *, num_classes: int, in_channels: int,
                   ntk_seed: int, thin_seed: int, device: torch.device | str) -> tuple[TenasNetwork, TenasNetwork]:
    """TE-NAS's NTK network and its thin network for the region count (no stem, one input
    channel), each initialised from its own seed, in training mode."""
    def build(seed: int, thin: bool) -> TenasNetwork:
        with _seeded(seed):
            net = TenasNetwork(switches, channels=config.channels, num_classes=num_classes,
                               in_channels=1 if thin else in_channels, cells=config.cells, stem=not thin,
                               stem_multiplier=config.stem_multiplier)
        return net.to(device).train()

    return build(ntk_seed, thin=False), build(thin_seed, thin=True)


def study_switches(genotype: Genotype, config: TenasConfig, network: str) -> Switches:
    """The switches an architecture of the study is measured with (``network``: module docstring)."""
    if network not in TENAS_NETWORKS:
        raise ValueError(f"network must be one of {', '.join(TENAS_NETWORKS)}, got {network!r}")
    return architecture_switches(genotype) if network == "architecture" else initial_switches(config.operations)


def tenas_values(ntk_network: nn.Module, thin_network: nn.Module, inputs: TenasInputs) -> MetricValues:
    """``ntk_condition_number``: the mean over the NTK batches of each batch's condition number
    (undefined, with the reason, if any batch's is); ``linear_regions``: the distinct activation
    patterns of the thin network over all the crops."""
    values = MetricValues()
    kappas = []
    for b, batch in enumerate(inputs.ntk_batches):
        result = ntk_condition_number(ntk_network, batch)
        if not result.defined:
            values.undefined["ntk_condition_number"] = (f"batch {b + 1} of {len(inputs.ntk_batches)}: "
                                                        f"{result.undefined}")
            break
        kappas.append(result.kappa)
    values["ntk_condition_number"] = (float("nan") if "ntk_condition_number" in values.undefined
                                      else float(np.mean(kappas)))
    values["linear_regions"] = float(linear_regions(thin_network, inputs.crops))
    return values

