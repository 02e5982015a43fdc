"""Poisoning attacks behind one call: ``poison(dataset, spec) -> PoisonSet``.

Budgets are fractions of the training set: exactly ``round(budget * n)`` samples, drawn
at random with the spec's seed, are poisoned. Perturbation bounds are in 0..255 pixel
units; images stay in [0, 1] and are published as uint8.

Implemented here:
- ``rlf``: random label flipping, each poisoned label to a uniformly random *other* class;
- ``gaussian``: clean-label Gaussian noise, sigma and l_inf bound in pixel units.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from .data import ImageDataset
from .poison_set import PoisonSet

log = logging.getLogger(__name__)

ATTACKS = ("rlf", "gaussian")


@dataclass(frozen=True)
class AttackSpec:
    name: str
    budget: float
    seed: int = 0
    eps: float = 16.0      # l_inf bound, pixel units (clean-label attacks)
    sigma: float = 16.0    # Gaussian noise standard deviation, pixel units

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"attack name {self.name!r} is unknown; allowed: {', '.join(ATTACKS)}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"attack budget must be in (0, 1], got {self.budget}")
        if not 0 <= self.eps <= 255:
            raise ValueError(f"attack eps must be in 0..255 pixel units, got {self.eps}")
        if self.sigma < 0:
            raise ValueError(f"attack sigma must be >= 0 pixel units, got {self.sigma}")


def poison_count(n: int, budget: float) -> int:
    return int(round(budget * n))


def choose_victims(n: int, budget: float, seed: int) -> torch.Tensor:
    """The sorted indices of a fixed-size random subset."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.sort(rng.choice(n, size=poison_count(n, budget), replace=False))).long()


def random_label_flip(dataset: ImageDataset, spec: AttackSpec) -> PoisonSet:
    victims = choose_victims(len(dataset), spec.budget, spec.seed)
    rng = np.random.default_rng([spec.seed, 1])
    old = dataset.labels[victims].numpy()
    # uniform over the other k-1 classes: shift by 1..k-1 modulo k
    shift = rng.integers(1, dataset.num_classes, size=len(victims))
    new = (old + shift) % dataset.num_classes
    return PoisonSet(indices=victims, labels=torch.from_numpy(new).long())


def gaussian_noise(dataset: ImageDataset, spec: AttackSpec) -> PoisonSet:
    victims = choose_victims(len(dataset), spec.budget, spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    clean = dataset.images[victims].float()
    noise = torch.randn(clean.shape, generator=generator) * spec.sigma
    noise = noise.clamp(-spec.eps, spec.eps)
    poisoned = publish(clean + noise, clean, spec.eps)
    return PoisonSet(indices=victims, labels=dataset.labels[victims].clone(), images=poisoned)


def publish(poisoned: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """Round to uint8 pixels the way a published image is, staying within eps of the clean
    pixels (both in 0..255 units) and within 0..255."""
    low = (clean - eps).clamp(min=0)
    high = (clean + eps).clamp(max=255)
    return torch.minimum(torch.maximum(poisoned.round(), low.ceil()), high.floor()).to(torch.uint8)


_RECIPES = {"rlf": random_label_flip, "gaussian": gaussian_noise}


def poison(dataset: ImageDataset, spec: AttackSpec) -> PoisonSet:
    """Craft the poison set of ``spec`` against ``dataset`` (never modified)."""
    start = time.perf_counter()
    poison_set = _RECIPES[spec.name](dataset, spec)
    poison_set.header = {
        "attack": spec.name,
        "budget": spec.budget,
        "eps": spec.eps if spec.name != "rlf" else None,
        "seed": spec.seed,
        "dataset": dataset.name,
        "dataset_size": len(dataset),
        "source_checksum": dataset.checksum(),
        "crafting_seconds": time.perf_counter() - start,
    }
    log.info("%s: poisoned %d of %d samples in %.1f s", spec.name, len(poison_set), len(dataset), poison_set.header["crafting_seconds"])
    return poison_set
