"""Toys for the tests: seeded random uint8 images and the tiny DARTS supernet, small and fast."""
import torch

from nbutils.core.image_dataset import ImageDataset
from nbutils.nas.nsganetv2 import Nsganetv2Config
from nbutils.space.supernet import SuperNet


def toy(n: int, *, seed: int, num_classes: int = 3, channels: int = 1, size: int = 8, labels=None,
        random_labels: bool = False, name: str = "toy") -> ImageDataset:
    """``n`` random images; labels cycle through the classes, or are drawn at random after the
    images from the same generator (``random_labels``), or are given."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    if labels is None:
        labels = torch.randint(0, num_classes, (n,), generator=g) if random_labels else torch.arange(n) % num_classes
    return ImageDataset(name, images, torch.as_tensor(labels, dtype=torch.int64),
                        tuple(f"c{i}" for i in range(num_classes)))


def toy_supernet(seed: int = 0, **overrides) -> SuperNet:
    """The tiny DARTS supernet for :func:`toy` images: 4 channels, 3 cells, 3 classes, one input
    channel, its weights and alphas drawn from ``seed``; ``overrides``: other SuperNet arguments."""
    return SuperNet(**{"channels": 4, "num_classes": 3, "layers": 3, "in_channels": 1, "seed": seed, **overrides})


def tiny_nsganetv2_config(**overrides) -> Nsganetv2Config:
    """NSGANetV2 at the smallest size that still runs every step (two iterations of two candidates)."""
    base = dict(initial_design=8, iterations=2, candidates_per_iteration=2, epochs=1, channels=4, layers=3,
                batch_size=16, calibration_batches=2, cost_channels=4, cost_layers=3, cart_trees=10,
                population=10, generations=3, cv_folds=4)
    return Nsganetv2Config(**{**base, **overrides})


class Reads:
    """A config that records which of its fields are read."""

    def __init__(self, config):
        self._config, self.read = config, set()

    def __getattr__(self, field):
        self.read.add(field)
        return getattr(self._config, field)
