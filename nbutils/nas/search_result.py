"""What every search algorithm returns: :class:`SearchResult`.

Kept apart from :mod:`nbutils.nas.darts` so that the algorithms that do not run DARTS (TE-NAS,
RoBoT, NSGANetV2) need not import it, nor the supernets it trains.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..space.genotype import Genotype


@dataclass
class SearchResult:
    """The architecture a search found and its records.

    ``history``: one JSON row per epoch (per ranking round for TE-NAS, per trained architecture
    for RoBoT, per measured architecture for NSGANetV2). ``stages``: one record per stage of the
    algorithm (P-DARTS' stages, TE-NAS' pruning rounds, RoBoT's and NSGANetV2's steps); empty
    for DARTS. ``supernets``: epoch -> ``SuperNet.checkpoint()``, the ones the caller asked for.

    ``arrays``: the search's numeric trace, saved beside the genotype as ``arrays.npz``; its
    names depend on the algorithm (E: epochs, 14 edges, O: candidate operations per edge):

    * DARTS: ``alpha_normal``, ``alpha_reduce``, alpha after each epoch (E x 14 x 8);
    * P-DARTS: ``alpha_normal_stage{s}``, ``alpha_reduce_stage{s}``, alpha after each epoch of
      stage s over the operations still switched on (E x 14 x O);
    * TE-NAS: ``active_normal``, ``active_reduce``, the alive operations (1, else 0) at the start
      and after each ranking round (rounds + 1 x 14 x 8);
    * RoBoT: ``pool_metrics`` and ``pool_normalised`` (pool x metrics, raw and normalised),
      ``pool_defined`` (each architecture's metrics all finite), ``query_weights``,
      ``query_pool_index``, ``query_objective`` (per Bayesian-optimisation query),
      ``trained_pool_index``, ``trained_val_acc`` (per trained architecture), ``best_weights``;
    * NSGANetV2: the archive of measured architectures, ``archive_encodings``,
      ``archive_error``, ``archive_cost``, ``archive_iteration``, and the archive rows of its
      ``pareto_indices`` and ``four_best``;
    * random sampling: none.
    """

    genotype: Genotype
    history: list[dict] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)
    supernets: dict[int, dict] = field(default_factory=dict)
