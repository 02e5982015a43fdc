"""What every defence returns: the defended dataset, its record and per-sample arrays."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.image_dataset import ImageDataset


@dataclass
class DefenseResult:
    """The defended dataset, a JSON-plain record of what was done and how well, and per-sample
    arrays (numpy; for an ``.npz`` beside the record)."""

    dataset: ImageDataset
    record: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
