"""The attacks that need no model, only the data and the config's seed: random label flipping
(RLF) and clean-label Gaussian noise. Both poison ``round(budget * n)`` samples drawn at random
(:func:`nbutils.core.poison_set.choose_victims`); ``config`` is an
:class:`~nbutils.attacks.poisoning.AttackConfig`."""
from __future__ import annotations

import numpy as np
import torch

from ..core.image_dataset import ImageDataset
from ..core.poison_set import PoisonSet, choose_victims, publish


def random_label_flip(dataset: ImageDataset, config) -> PoisonSet:
    """RLF: each poisoned label to a uniformly random *other* class; images unchanged."""
    victims = choose_victims(len(dataset), config.budget, config.seed)
    rng = np.random.default_rng([config.seed, 1])
    old = dataset.labels[victims].numpy()
    # uniform over the other k-1 classes: shift by 1..k-1 modulo k
    shift = rng.integers(1, dataset.num_classes, size=len(victims))
    new = (old + shift) % dataset.num_classes
    return PoisonSet(indices=victims, labels=torch.from_numpy(new).long())


def gaussian_noise(dataset: ImageDataset, config) -> PoisonSet:
    """Clean-label noise: Gaussian of std ``config.sigma`` clipped to ``config.eps`` (pixel units)."""
    victims = choose_victims(len(dataset), config.budget, config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    clean = dataset.images[victims].float()
    noise = torch.randn(clean.shape, generator=generator) * config.sigma
    noise = noise.clamp(-config.eps, config.eps)
    poisoned = publish(clean + noise, clean, config.eps)
    return PoisonSet(indices=victims, labels=dataset.labels[victims].clone(), images=poisoned)
