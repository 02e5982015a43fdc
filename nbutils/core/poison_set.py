"""Poison sets: what an attacker publishes, and how a poisoned view of a dataset is made.

A poison set holds the poisoned indices, their replacement images as uint8 (so the
quantisation an attacker's published images undergo is part of the attack) or None for
label-only attacks, their labels, and a header (attack, budget, eps, seed, source dataset
and its checksum). On disk: ``poison.npz`` (no pickle) beside ``poison.json``. Loading
checks shapes, ranges and the source checksum, and refuses a mismatch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import ImageDataset
from .store import atomic_write_bytes, atomic_write_json

ARRAYS_FILE = "poison.npz"
HEADER_FILE = "poison.json"


class PoisonSetMismatch(ValueError):
    """A poison set that does not fit the dataset it is applied to, or was altered on disk."""


@dataclass
class PoisonSet:
    indices: torch.Tensor                 # int64, sorted, unique
    labels: torch.Tensor                  # int64, the labels the poisoned samples carry
    images: torch.Tensor | None = None    # uint8 P x C x H x W, or None when only labels change
    header: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    def apply(self, clean: ImageDataset) -> ImageDataset:
        """The poisoned view of ``clean``: a new dataset; ``clean`` is never modified."""
        source = self.header.get("source_checksum")
        if source is not None and source != clean.checksum():
            raise PoisonSetMismatch(
                f"poison set was crafted on dataset {self.header.get('dataset')!r} with checksum {source}, "
                f"but is applied to {clean.name!r} with checksum {clean.checksum()}"
            )
        return clean.with_replacements(self.indices, images=self.images, labels=self.labels)

    def arrays_checksum(self) -> str:
        digest = hashlib.sha256()
        for array in self._arrays().values():
            digest.update(array.tobytes())
        return digest.hexdigest()

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"indices": self.indices.numpy(), "labels": self.labels.numpy()}
        if self.images is not None:
            arrays["images"] = self.images.numpy()
        return arrays

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        import io

        buffer = io.BytesIO()
        np.savez_compressed(buffer, **self._arrays())
        atomic_write_bytes(directory / ARRAYS_FILE, buffer.getvalue())
        atomic_write_json(directory / HEADER_FILE, {**self.header, "arrays_sha256": self.arrays_checksum(), "count": len(self)})

    @classmethod
    def load(cls, directory: Path, clean: ImageDataset | None = None) -> "PoisonSet":
        """Read a poison set; with ``clean`` given, also check it fits that dataset."""
        directory = Path(directory)
        header = json.loads((directory / HEADER_FILE).read_text())
        with np.load(directory / ARRAYS_FILE, allow_pickle=False) as arrays:
            indices = torch.from_numpy(arrays["indices"].astype(np.int64))
            labels = torch.from_numpy(arrays["labels"].astype(np.int64))
            images = torch.from_numpy(arrays["images"]) if "images" in arrays.files else None
        poison = cls(indices=indices, labels=labels, images=images, header=header)
        expected = header.get("arrays_sha256")
        if expected != poison.arrays_checksum():
            raise PoisonSetMismatch(f"{directory}: the poison arrays do not match their recorded checksum (altered or corrupt file)")
        if len(labels) != len(indices) or (images is not None and len(images) != len(indices)):
            raise PoisonSetMismatch(f"{directory}: {len(indices)} indices but {len(labels)} labels / images")
        if images is not None and images.dtype != torch.uint8:
            raise PoisonSetMismatch(f"{directory}: images must be uint8, got {images.dtype}")
        if clean is not None:
            poison.apply(clean)  # raises on checksum, shape, index or label mismatch
        return poison


def publish(poisoned: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """Round to uint8 pixels the way a published image is, staying within eps of the clean
    pixels (both in 0..255 units) and within 0..255."""
    low = (clean - eps).clamp(min=0)
    high = (clean + eps).clamp(max=255)
    return torch.minimum(torch.maximum(poisoned.round(), low.ceil()), high.floor()).to(torch.uint8)
