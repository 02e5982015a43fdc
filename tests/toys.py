"""Toys for the tests: seeded random uint8 images and the tiny DARTS supernet, small and fast."""
import torch

from nbutils.core.data import ImageDataset
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
