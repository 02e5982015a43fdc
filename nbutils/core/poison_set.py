"""Poison sets: what an attacker publishes, and how a poisoned view of a dataset is made.

A poison set holds the poisoned indices, their replacement images as uint8 (so the
quantisation an attacker's published images undergo is part of the attack) or None for
label-only attacks, their labels, and a header (attack, budget, eps, seed, source dataset
and its checksum). On disk: ``poison.npz`` (no pickle) beside ``poison.json``. Loading
checks shapes, ranges and the source checksum, and refuses a mismatch.

The checksum in ``poison.json`` only proves that the arrays were not damaged by accident: whoever
edits the arrays can recompute it. What anchors a set is the record of the stage that crafted it
(``spec.json``, :mod:`nbutils.core.store`): the SHA-256 of both files and the attack's config.
Loading a set from a stage folder checks the files against that record, and the header's
attack, budget and count against the config, so a set swapped for a more poisoned one is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .image_dataset import ImageDataset
from .store import atomic_write_bytes, atomic_write_json

ARRAYS_FILE = "poison.npz"
HEADER_FILE = "poison.json"
STAGE_RECORD = "spec.json"   # :data:`nbutils.core.store.SPEC_FILE`, written by the stage that crafted the set


def poison_count(n: int, budget: float) -> int:
    """How many of ``n`` samples a budget poisons."""
    return int(round(budget * n))


def choose_victims(n: int, budget: float, seed: int) -> torch.Tensor:
    """Which of ``n`` samples a budget poisons: the sorted indices of a random subset of
    :func:`poison_count` samples, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.sort(rng.choice(n, size=poison_count(n, budget), replace=False))).long()


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
        if source is None:
            raise PoisonSetMismatch("poison set has no source_checksum in its header, so nothing says which dataset "
                                    "it was crafted on; it is refused")
        if source != clean.checksum():
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
        if len(indices) != header.get("count"):
            raise PoisonSetMismatch(f"{directory}: {len(indices)} poisoned samples, but the header says {header.get('count')}")
        if (directory / STAGE_RECORD).is_file():
            check_against_record(directory, header)
        if clean is not None:
            expected = poison_count(len(clean), header.get("budget", -1))
            if len(indices) != expected:
                raise PoisonSetMismatch(f"{directory}: {len(indices)} poisoned samples, but budget {header.get('budget')} "
                                        f"of {len(clean)} images poisons {expected}")
            poison.apply(clean)  # raises on checksum, shape, index or label mismatch
        return poison


def check_against_record(directory: Path, header: dict) -> None:
    """The set's files and header against the record of the stage that crafted it (see the
    module docstring); raises :class:`PoisonSetMismatch` naming what differs."""
    record = json.loads((directory / STAGE_RECORD).read_text())
    for name, digest in record.get("files", {}).items():
        if name in (ARRAYS_FILE, HEADER_FILE) and hashlib.sha256((directory / name).read_bytes()).hexdigest() != digest:
            raise PoisonSetMismatch(f"{directory / name} does not match the SHA-256 its stage recorded (altered file)")
    attack = record.get("spec", {}).get("attack", {})
    for field_name in ("name", "budget", "seed"):
        said = header.get("attack" if field_name == "name" else field_name)
        if field_name in attack and said != attack[field_name]:
            raise PoisonSetMismatch(f"{directory}: the header's {field_name} {said!r} is not the {attack[field_name]!r} "
                                    "its stage crafted")


def publish(poisoned: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """Round to uint8 pixels the way a published image is, staying within eps of the clean
    pixels (both in 0..255 units) and within 0..255."""
    low = (clean - eps).clamp(min=0)
    high = (clean + eps).clamp(max=255)
    return torch.minimum(torch.maximum(poisoned.round(), low.ceil()), high.floor()).to(torch.uint8)
