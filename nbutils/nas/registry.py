"""One record per NAS algorithm: its search.yaml section and engine config, how a search stage
runs it, the name the papers give it, and the facts the rest of the package asks of it.

Everything that lists algorithms derives from :data:`ALGORITHMS`: the names grid.yaml accepts
and the search.yaml sections (:mod:`nbutils.pipeline.params`), the stages the grid expands to
(:mod:`nbutils.pipeline.stages`: gradient canceling's target, mixed precision, the clean-only
reference), the search step (:mod:`nbutils.pipeline.steps`) and the report's names
(:mod:`nbutils.report.names`). Adding an algorithm is a module with its config and search
function and one :class:`NasAlgorithm` here: search.yaml's section of the same name follows (the
README's "Adding a NAS algorithm" shows it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..core.image_dataset import ImageDataset, concatenate
from .darts import DartsConfig, darts_search
from .nsganetv2 import Nsganetv2Config, nsganetv2_search
from .pdarts import PdartsConfig, pdarts_search
from .robot import RobotConfig, robot_search
from . import search_cost
from .search_result import SearchResult
from .tenas import TenasConfig, tenas_search

#: a search stage's run of an algorithm: (weight half, architecture half of the search data, the
#: stage's spec; seed, device, ...) -> what it found
StageSearch = Callable[..., SearchResult]
#: a search's work: (its config section as a dict, images of the search data, image side) -> units
WorkUnits = Callable[[dict, int, int], float]


@dataclass(frozen=True)
class NasAlgorithm:
    """What the package needs to know of one NAS algorithm."""

    name: str                  #: as grid.yaml names it
    display_name: str          #: as the papers name it (the report's tables)
    config: type               #: its engine config: the search.yaml section ``section``
    search: StageSearch        #: how a search stage runs it (:data:`StageSearch`)
    section: str = ""          #: its search.yaml section (default: ``name``; darts_anti shares DARTS')
    #: a supernet with architecture weights: gradient canceling targets its alpha (NAS-specific GC,
    #: TMLR §3.2), else the weights of its best clean architecture
    supernet: bool = False
    mixed_precision: bool = False   #: ``search.mixed_precision`` applies to it (the others train in float32)
    label_free: bool = False        #: never reads labels: label flipping cannot change what it finds
    clean_only: bool = False        #: searched on clean data only (anti-search: a worst-case reference)
    #: the algorithm whose clean trials its own are tested against (anti-search: DARTS, the
    #: workshop paper's Table 1); empty: its poisoned trials are tested against its clean ones
    tested_against: str = ""
    #: ranks architectures by training-free metrics, whose sensitivity to poisons the metric
    #: sensitivity study measures (TMLR Table 2)
    metric_based: bool = False
    #: its search's work in the cost model's units (:mod:`nbutils.nas.search_cost`); None: one
    #: unit per search
    work_units: WorkUnits | None = None

    def __post_init__(self) -> None:
        if not self.section:
            object.__setattr__(self, "section", self.name)


def _darts(weight_part: ImageDataset, arch_part: ImageDataset, spec: dict, **common) -> SearchResult:
    keep = set(spec.get("keep_supernets", ()))
    if "keep_supernets" in spec:
        keep.add(spec["config"]["epochs"])   # the converged supernet, always
    config = DartsConfig(**spec["config"], augment=spec["augment"], fast=spec.get("fast", True),
                         anti=spec["algorithm"] == "darts_anti", keep_epochs=tuple(sorted(keep)),
                         mixed_precision=spec.get("mixed_precision", False))
    return darts_search(weight_part, arch_part, config, **common)


def _pdarts(weight_part: ImageDataset, arch_part: ImageDataset, spec: dict, **common) -> SearchResult:
    config = PdartsConfig(**spec["config"], augment=spec["augment"], fast=spec.get("fast", True),
                          mixed_precision=spec.get("mixed_precision", False))
    return pdarts_search(weight_part, arch_part, config, **common)


def _robot(weight_part: ImageDataset, arch_part: ImageDataset, spec: dict, **common) -> SearchResult:
    return robot_search(weight_part, arch_part, RobotConfig(**spec["config"]), **common)


def _nsganetv2(weight_part: ImageDataset, arch_part: ImageDataset, spec: dict, **common) -> SearchResult:
    return nsganetv2_search(weight_part, arch_part, Nsganetv2Config(**spec["config"], augment=spec["augment"]), **common)


def _tenas(weight_part: ImageDataset, arch_part: ImageDataset, spec: dict, **common) -> SearchResult:
    # training-free: TE-NAS reads the whole search data, both halves
    config = TenasConfig(**spec["config"], augment=spec["augment"])
    return tenas_search(concatenate(weight_part, arch_part), config, **common)


#: every NAS algorithm, in the order grid.yaml lists them and the report shows them
ALGORITHMS: dict[str, NasAlgorithm] = {a.name: a for a in (
    NasAlgorithm("darts", "DARTS", DartsConfig, _darts, supernet=True, mixed_precision=True,
                 work_units=search_cost.darts_units),
    # the workshop paper's anti-search (DARTS maximising the loss), Table 1
    NasAlgorithm("darts_anti", "DARTS anti-search", DartsConfig, _darts, section="darts", supernet=True,
                 mixed_precision=True, clean_only=True, tested_against="darts", work_units=search_cost.darts_units),
    NasAlgorithm("pdarts", "P-DARTS", PdartsConfig, _pdarts, supernet=True, mixed_precision=True,
                 work_units=search_cost.pdarts_units),
    NasAlgorithm("tenas", "TE-NAS", TenasConfig, _tenas, label_free=True, metric_based=True),
    NasAlgorithm("robot", "RoBoT", RobotConfig, _robot, metric_based=True, work_units=search_cost.robot_units),
    NasAlgorithm("nsganetv2", "NSGANetV2", Nsganetv2Config, _nsganetv2, work_units=search_cost.nsganetv2_units),
)}


def names(**flags: bool) -> tuple[str, ...]:
    """The algorithms whose flags (``supernet``, ``mixed_precision``, ``label_free``,
    ``clean_only``, ``metric_based``) have the given values, in :data:`ALGORITHMS` order."""
    return tuple(a.name for a in ALGORITHMS.values() if all(getattr(a, f) == v for f, v in flags.items()))


#: the search.yaml sections: each algorithm's own, in order (darts_anti has none)
SECTIONS: dict[str, type] = {a.section: a.config for a in ALGORITHMS.values() if a.section == a.name}


#: the algorithms tested against another's clean trials (:attr:`NasAlgorithm.tested_against`)
TESTED_AGAINST: dict[str, str] = {a.name: a.tested_against for a in ALGORITHMS.values() if a.tested_against}
