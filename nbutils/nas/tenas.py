"""TE-NAS: training-free architecture search by pruning (Chen, Gong and Wang, ICLR 2021).

No network is trained. Starting from the DARTS supernet with every operation on every edge,
TE-NAS repeatedly removes the operations whose removal helps two training-free indicators
most (:mod:`nbutils.nas.ntk`): the condition number ``kappa`` of the neural tangent kernel
(lower: more trainable) and the number of linear regions of the ReLU network (higher: more
expressive). Written from ``VITA-Group/TENAS`` (``prune_tenas.py`` with the DARTS-space
settings of ``prune_launch.py``); the poisoning study's fork (``ztcoalson/TENAS``) feeds the
poisoned training set to both indicators, as :func:`tenas_search` does with ``dataset``.

The search, as the reference runs it in the DARTS space:

1. ``none`` is removed from every edge at the start; 7 operations remain per edge.
2. **Operation pruning** rounds, until one operation is left per edge. In a round, for every
   remaining operation ``o`` of every edge with more than one operation (normal and
   reduction cell), measure

   * ``kappa_change = mean_r round((kappa_r(A) - kappa_r(A - o)) / kappa_r(A), 3)`` over
     ``repeats`` (3) repetitions ``r``, where ``A`` is the current supernet and ``A - o``
     the supernet without ``o``, both with the same weights and on the same batch of 14
     training images (a fresh batch per repetition);
   * ``region_change = mean_r round((R_r(A) - R_r(A - o)) / R_r(A), 3)``, the relative
     change of the linear-region count of a thin version of the supernet (no stem) on 3
     batches of 1000 random 3x3 single-channel crops of the training images (fresh crops per
     repetition; one freshly initialised thin network per candidate, shared by ``A`` and
     ``A - o``).

   Rank all candidates of the round by ``kappa_change`` (descending: removing the operation
   lowers kappa most -> rank 0) and by ``region_change`` (ascending: removing it raises the
   region count most -> rank 0), dense ranks with ties sharing a rank; sum the two ranks
   (:func:`~nbutils.nas.tenas_pruning.rank_candidates`); on every edge remove the ``prune_per_round`` (3) operations
   with the lowest sums (:func:`~nbutils.nas.tenas_pruning.operations_to_prune`). 7 -> 4 -> 1 operations per edge.
3. **Edge pruning**: node by node (normal cell first), for a node with more than two
   incoming edges, the candidates are its edges (each now carries one operation); the same
   measurements and ranks within the node; all but the two edges with the highest rank sums
   are removed (:func:`~nbutils.nas.tenas_pruning.edges_to_prune`).
4. The genotype reads the two remaining edges of every node and their operation.

Networks (:class:`TenasNetwork`), as ``NASNetworkDARTS`` with the reference's model
configuration: ``C = 1``, two cells (a normal cell with ``C`` and a reduction cell with
``2C`` channels), stem multiplier 1, affine BN, every pool without BN, and BN + ReLU
before global pooling (the last ReLU matters: without it the training-mode NTK is exactly
singular, see :mod:`nbutils.nas.ntk`). Operations are weighted uniformly, ``1 / k`` for the
``k`` operations alive on an edge (the reference's softmax over 0 and -1000), and removed
ones are skipped (they contribute nothing and their weights get no gradient, so they are not
part of the NTK). The NTK is taken over every parameter named ``weight`` (convolutions,
affine BN, classifier) in training mode (batch statistics). The networks keep PyTorch's
default initialisation: the reference's launcher asks for ``kaiming_normal``, which its
``init_model`` does not know, so its networks are never re-initialised; within a round one
NTK network serves every candidate and repetition. Batches for the NTK are augmented as the
reference's training loader (random crop with 4-pixel padding, horizontal flip) and
normalised with ``normalisation``.

Cost (measured on 600 random 16x16x1 images, the quick preset's search data, one thread of a
shared 2-core CPU): 332 candidates (196 in the first round, 112 in the second, 24 edges);
one NTK of the full 7-operation supernet takes ~0.4 s, one region count of 3 x 1000 crops
~0.3 s. With ``repeats=1, fresh_batches=False, region_batches=1`` a search took 168 s of CPU
time (536 s wall on the busy machine); the reference settings (6 NTKs and 6 region counts
per candidate) cost about 8x that, ~25 minutes of CPU.

Deliberate departures from the reference:

* An undefined indicator is an error (:class:`~nbutils.nas.zero_cost.MetricUndefined`, naming
  the round, the candidate and the reason), never a number: the reference turns a singular
  NTK into 100000 or a meaningless huge/negative ratio and ranks it.
* Linear regions are counted exactly (:func:`nbutils.nas.ntk.linear_regions`; the reference sums
  float32 reciprocals of multiplicities) and kappa's eigenvalues are taken in float64.
* Edge pruning measures each node against the current architecture. The reference's NTK
  network for edge pruning keeps the architecture from before edge pruning for every node,
  so for the later nodes of a cell the "origin" still has the edges already removed.
* Operations are indexed in :data:`nbutils.space.ops.PRIMITIVES` order (the reference lists them
  differently); the order only decides ties.
* ``fresh_batches=False`` (not the default) measures every candidate of a round on the same
  ``repeats`` NTK batches, crop batches and thin networks, so each origin value is computed
  once per round instead of once per candidate: about half the work, and candidates are
  compared on common data. ``operations`` (default: all seven) restricts the operations every
  edge starts with, e.g. for small experiments.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Annotated, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import field_validator

from ..core.config import NOT_BOOLEAN, PositiveInt, config, integer, keyed, keyed_when_changed, set_by_run
from ..core.batches import BatchLoader
from ..core.image_dataset import ImageDataset, channel_stats, resized
from ..space.genotype import NUM_EDGES, STEPS, Genotype, parse_alpha
from .ntk import linear_regions, ntk_condition_number, region_inputs
from .search_result import SearchResult
from ..space.ops import PRIMITIVES
from .tenas_pruning import edges_to_prune, operations_to_prune, rank_candidates, relative_change
from .tenas_network import (CELL_TYPES, EDGES_PER_NODE, SEARCH_OPERATIONS, Candidate, Switches, TenasNetwork,
                            initial_switches)
from ..core.progress import progress
from .zero_cost import MetricUndefined

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- configuration


@config
class TenasConfig:
    """TE-NAS's settings; the defaults are the reference's (``prune_launch.py --space darts``,
    CIFAR-10). Every field but ``augment`` is what search.yaml's ``tenas:`` sets; the run sets
    ``augment`` for each search."""

    batch_size: integer(2) = keyed(14)   # images per NTK batch (an NTK of one image has no condition number)
    channels: PositiveInt = keyed(1)   # C of the NTK and region networks
    # a normal cell, then a reduction cell (a third: another reduction)
    cells: Annotated[Literal[2, 3], NOT_BOOLEAN] = keyed(2)
    stem_multiplier: PositiveInt = keyed_when_changed(1)
    repeats: PositiveInt = keyed(3)   # repetitions of both measurements per candidate
    region_batches: PositiveInt = keyed(3)   # batches of crops per region count
    region_batch_size: integer(2) = keyed(1000)   # crops per batch (one crop alone has a single region)
    region_crop: PositiveInt = keyed_when_changed(3)   # crop side, in pixels
    prune_per_round: PositiveInt = keyed(3)   # operations removed per edge per round
    # decimals of each relative change; significant digits of the ranking key
    precision: PositiveInt = keyed_when_changed(3)
    fresh_batches: bool = keyed(True)   # False: common NTK batches, crops and thin networks for a round
    operations: tuple[str, ...] = keyed_when_changed(SEARCH_OPERATIONS)   # the operations every edge starts with
    image_size: integer(8) | None = keyed(None)   # resize the images to this side for both indicators (None: as given)
    # set by the run
    augment: bool = set_by_run(True)   # NTK batches: random crop (padding 4) and flip, as the reference's loader

    @field_validator("operations")
    @classmethod
    def _search_operations(cls, operations: tuple[str, ...]) -> tuple[str, ...]:
        """Distinct operations of the search space, put in its order (which decides ties)."""
        if not operations or len(set(operations)) != len(operations) or any(op not in SEARCH_OPERATIONS
                                                                             for op in operations):
            raise ValueError(f"must list distinct operations of {', '.join(SEARCH_OPERATIONS)}")
        return tuple(op for op in SEARCH_OPERATIONS if op in operations)


# --------------------------------------------------------------------------- measurements


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw from PyTorch's global generator seeded with ``seed``, and restore it afterwards
    (module constructors initialise their weights from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _kappa(network: TenasNetwork, batch: torch.Tensor, where: str) -> float:
    result = ntk_condition_number(network, batch)
    if not result.defined:
        raise MetricUndefined("ntk_condition_number", f"{result.undefined} ({where})")
    return result.kappa


class _Indicators:
    """Both indicators of one architecture and its candidates, with the reference's data."""

    def __init__(self, dataset: ImageDataset, config: TenasConfig, mean, std, seed: int, device: torch.device):
        self.dataset, self.config, self.device = dataset, config, device
        self.mean, self.std = tuple(mean), tuple(std)
        self.loader = BatchLoader(dataset, config.batch_size, shuffle=True, seed=seed, augment=config.augment,
                                  mean=mean, std=std, device=device)
        self.crop_generator = torch.Generator().manual_seed(_derived_seed(seed, 1))

    def ntk_batch(self) -> torch.Tensor:
        """The first batch of a fresh shuffle, as ``get_ntk_n`` takes from a new iterator."""
        return next(iter(self.loader))[0]

    def crops(self) -> list[torch.Tensor]:
        c = self.config
        batches = region_inputs(self.dataset.images, num_batches=c.region_batches, batch_size=c.region_batch_size,
                                crop=c.region_crop, generator=self.crop_generator, mean=self.mean, std=self.std)
        return [b.to(self.device) for b in batches]

    def network(self, switches: Switches, seed: int, *, thin: bool) -> TenasNetwork:
        c = self.config
        with _seeded(seed):
            net = TenasNetwork(switches, channels=c.channels, num_classes=self.dataset.num_classes,
                               in_channels=1 if thin else self.dataset.in_channels, cells=c.cells, stem=not thin,
                               stem_multiplier=c.stem_multiplier)
        return net.to(self.device).train()

    def measure(self, switches: Switches, candidates: Sequence[Candidate], seed: int,
                desc: str) -> dict[Candidate, dict]:
        """Per candidate: ``kappa`` and ``regions`` per repetition, ``(origin, without it)``, and
        the mean relative changes ``kappa_change`` and ``region_change``."""
        c = self.config
        ntk_net = self.network(switches, _derived_seed(seed, 0), thin=False)
        shared = None
        if not c.fresh_batches:   # common data for the whole round: each origin value once
            shared = []
            for r in range(c.repeats):
                batch, crops = self.ntk_batch(), self.crops()
                thin = self.network(switches, _derived_seed(seed, 1, r), thin=True)
                shared.append((batch, crops, thin, _kappa(ntk_net, batch, f"{desc}, the architecture itself"),
                               linear_regions(thin, crops)))
        results: dict[Candidate, dict] = {}
        for index, candidate in enumerate(progress(candidates, desc=desc)):
            where = f"{desc}, without {candidate[2]} on {candidate[0]} edge {candidate[1]}"
            thin_fresh = None if shared else self.network(switches, _derived_seed(seed, 2, index), thin=True)
            kappas, regions = [], []
            for r in range(c.repeats):
                if shared:
                    batch, crops, thin, kappa_origin, regions_origin = shared[r]
                else:
                    batch, crops, thin = self.ntk_batch(), self.crops(), thin_fresh
                    kappa_origin = _kappa(ntk_net, batch, f"{desc}, the architecture itself")
                    regions_origin = linear_regions(thin, crops)
                with ntk_net.without([candidate]):
                    kappa = _kappa(ntk_net, batch, where)
                with thin.without([candidate]):
                    region_count = linear_regions(thin, crops)
                kappas.append((kappa_origin, kappa))
                regions.append((regions_origin, region_count))
            results[candidate] = {
                "kappa": kappas,
                "regions": regions,
                "kappa_change": float(np.mean([relative_change(o, k, c.precision) for o, k in kappas])),
                "region_change": float(np.mean([relative_change(o, k, c.precision) for o, k in regions])),
            }
        return results


# --------------------------------------------------------------------------- the search


def _check_dataset(dataset: ImageDataset, config: TenasConfig) -> None:
    if not isinstance(dataset, ImageDataset):
        raise ValueError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
    if len(dataset) < config.batch_size:
        raise ValueError(f"dataset must hold at least batch_size={config.batch_size} images (one NTK batch), "
                         f"got {len(dataset)}")
    _, h, w = dataset.shape_chw
    if min(h, w) < config.region_crop:
        raise ValueError(f"images must be at least region_crop={config.region_crop} pixels on a side, got {h}x{w}")
    if min(h, w) < 2 ** config.cells:
        raise ValueError(f"images of {h}x{w} are too small for {config.cells} cells (each reduction halves the size)")


def active_mask(switches: Switches) -> dict[str, np.ndarray]:
    """Per cell type, ``NUM_EDGES x len(PRIMITIVES)``: 1 where the operation is alive."""
    masks = {}
    for kind in CELL_TYPES:
        mask = np.zeros((NUM_EDGES, len(PRIMITIVES)))
        for e, ops in enumerate(switches[kind]):
            for op in ops:
                mask[e, PRIMITIVES.index(op)] = 1.0
        masks[kind] = mask
    return masks


def genotype_of(switches: Switches) -> Genotype:
    """The genotype of a pruned architecture: every node must keep exactly two edges with one
    operation each."""
    offset = 0
    for node in range(STEPS):
        for kind in CELL_TYPES:
            edges = switches[kind][offset: offset + 2 + node]
            alive = [len(ops) for ops in edges if ops]
            if len(alive) != EDGES_PER_NODE or any(n != 1 for n in alive):
                raise ValueError(f"{kind} node {node + 2} must keep {EDGES_PER_NODE} edges with one operation each, "
                                 f"got {[list(ops) for ops in edges]}")
        offset += 2 + node
    masks = active_mask(switches)
    return Genotype(normal=parse_alpha(masks["normal"]), reduce=parse_alpha(masks["reduce"]))


def _record(stage: str, number: int, measured: Mapping[Candidate, dict], ranking, pruned, seconds: float,
            **extra) -> dict:
    ranks = {cand: (kr, rr) for cand, kr, rr in ranking}
    return {
        "round": number,
        "stage": stage,
        **extra,
        "candidates": [
            {"cell": cand[0], "edge": cand[1], "op": cand[2],
             "kappa_change": m["kappa_change"], "region_change": m["region_change"],
             "kappa_rank": ranks[cand][0], "region_rank": ranks[cand][1],
             "kappa": [list(map(float, pair)) for pair in m["kappa"]],
             "regions": [list(map(int, pair)) for pair in m["regions"]]}
            for cand, m in measured.items()
        ],
        "pruned": [list(c) for c in pruned],
        "seconds": seconds,
    }


def tenas_search(
    dataset: ImageDataset,
    config: TenasConfig,
    *,
    seed: int,
    device: torch.device | str,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> SearchResult:
    """Run TE-NAS on the (possibly poisoned) search data ``dataset``.

    Both indicators read ``dataset``'s images (labels are not used): the NTK batches and the
    crops of the region count. ``normalisation`` is the per-channel (mean, std) of the inputs;
    by default it is computed from ``dataset`` (pass the clean data's so that poisons cannot
    shift it, as :func:`nbutils.nas.darts.darts_search` explains).

    Returns a :class:`~nbutils.nas.search_result.SearchResult`: ``genotype``; ``history`` one row per
    ranking (each operation-pruning round, then each node whose edges were pruned) with every
    candidate's mean changes, ranks and per-repetition ``kappa``/``regions`` pairs (the
    architecture, the architecture without the candidate), what was pruned and the seconds it
    took; ``stages`` the operations alive after each row; ``alphas`` ``active_normal`` and
    ``active_reduce`` (rows + 1) x 14 x 8, 1 where an operation is alive (row 0: the start).
    Raises :class:`~nbutils.nas.zero_cost.MetricUndefined` when an indicator is undefined.
    """
    dataset, mean, std = _search_data(dataset, config, seed, normalisation)
    device = torch.device(device)
    indicators = _Indicators(dataset, config, mean, std, int(seed), device)
    switches = initial_switches(config.operations)   # 1. every operation but none, on every edge
    trail = _Trail(switches)
    number = _prune_operations(indicators, switches, config, seed, trail)   # 2. until one operation per edge
    _prune_edges(indicators, switches, config, seed, number, trail)         # 3. until two edges per node
    genotype = genotype_of(switches)                                        # 4.
    log.info("TE-NAS: %s", genotype.summary())
    return SearchResult(genotype=genotype, history=trail.history, arrays=trail.active_arrays(), stages=trail.stages)


def _search_data(dataset: ImageDataset, config: TenasConfig, seed: int,
                 normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None
                 ) -> tuple[ImageDataset, Sequence[float], Sequence[float]]:
    """Set-up (before step 1): the arguments checked, the normalisation, the images resized if asked."""
    if not isinstance(config, TenasConfig):
        raise ValueError(f"config must be a TenasConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    mean, std = normalisation or channel_stats(dataset)   # per channel: the same after resizing
    if config.image_size is not None:
        dataset = resized(dataset, config.image_size)
    _check_dataset(dataset, config)
    return dataset, mean, std


class _Trail:
    """What the search records: one ``history`` row per ranking, the operations alive after it
    (``stages``) and the masks of alive operations (row 0: the start)."""

    def __init__(self, switches: Switches):
        self.switches = switches   # the search's switches, pruned in place
        self.history: list[dict] = []
        self.stages: list[dict] = []
        self.masks = {kind: [m] for kind, m in active_mask(switches).items()}

    def add(self, row: dict) -> None:
        self.history.append(row)
        self.stages.append({"round": row["round"], "stage": row["stage"],
                            "alive": {kind: [list(ops) for ops in self.switches[kind]] for kind in CELL_TYPES}})
        for kind, m in active_mask(self.switches).items():
            self.masks[kind].append(m)

    def active_arrays(self) -> dict[str, np.ndarray]:
        """The masks of alive operations per cell type, one row per ranking (row 0: the start)."""
        return {f"active_{kind}": np.stack(self.masks[kind]) for kind in CELL_TYPES}


def _ranking(measured: Mapping[Candidate, dict], precision: int) -> list[tuple[Candidate, int, int]]:
    """Steps 2 and 3: the candidates ranked by the sum of their kappa and region ranks."""
    return rank_candidates({k: v["kappa_change"] for k, v in measured.items()},
                           {k: v["region_change"] for k, v in measured.items()}, precision)


def _prune_operations(indicators: _Indicators, switches: Switches, config: TenasConfig, seed: int,
                      trail: _Trail) -> int:
    """Step 2: operation-pruning rounds until one operation is left per edge; returns the rounds run."""
    number = 0
    while any(len(ops) > 1 for kind in CELL_TYPES for ops in switches[kind]):
        number += 1
        start = time.perf_counter()
        per_edge = min(config.prune_per_round, len(switches["normal"][0]) - 1)
        candidates = [(kind, e, op) for kind in CELL_TYPES for e, ops in enumerate(switches[kind]) if len(ops) > 1
                      for op in ops]
        measured = indicators.measure(switches, candidates, _derived_seed(seed, 10, number),
                                      f"TE-NAS round {number}: operations")
        ranking = _ranking(measured, config.precision)
        pruned = operations_to_prune(ranking, per_edge)
        for kind, e, op in pruned:
            switches[kind][e] = tuple(o for o in switches[kind][e] if o != op)
        trail.add(_record("operations", number, measured, ranking, pruned, time.perf_counter() - start))
        log.info("TE-NAS round %d: %d candidates, pruned %d operations (%d per edge) in %.1fs",
                 number, len(candidates), len(pruned), per_edge, time.perf_counter() - start)
    return number


def _prune_edges(indicators: _Indicators, switches: Switches, config: TenasConfig, seed: int, number: int,
                 trail: _Trail) -> None:
    """Step 3: node by node, the edges of a node with more than two pruned to the best two;
    rounds numbered on from ``number``."""
    offset_of = [sum(2 + i for i in range(node)) for node in range(STEPS)]
    for kind in CELL_TYPES:
        for node in range(STEPS):
            edges = [e for e in range(offset_of[node], offset_of[node] + 2 + node) if switches[kind][e]]
            if len(edges) <= EDGES_PER_NODE:
                continue
            number += 1
            start = time.perf_counter()
            candidates = [(kind, e, switches[kind][e][0]) for e in edges]
            measured = indicators.measure(switches, candidates, _derived_seed(seed, 10, number),
                                          f"TE-NAS round {number}: edges of {kind} node {node + 2}")
            ranking = _ranking(measured, config.precision)
            pruned = edges_to_prune(ranking)
            for _, e, _ in pruned:
                switches[kind][e] = ()
            trail.add(_record("edges", number, measured, ranking, pruned, time.perf_counter() - start,
                              cell=kind, node=node + 2))
            log.info("TE-NAS round %d: %s node %d keeps edges from %s", number, kind, node + 2,
                     [e - offset_of[node] for e in edges if switches[kind][e]])
