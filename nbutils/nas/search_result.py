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
    genotype: Genotype
    history: list[dict] = field(default_factory=list)   # one row per epoch
    alphas: dict[str, np.ndarray] = field(default_factory=dict)  # "alpha_normal": epochs x 14 x 8, ...
    stages: list[dict] = field(default_factory=list)    # P-DARTS: one record per stage; empty for DARTS
    supernets: dict[int, dict] = field(default_factory=dict)   # epoch -> SuperNet.checkpoint(), as asked
