"""Toy datasets for the tests: seeded random uint8 images, small and fast."""
import torch

from nbutils.core.data import ImageDataset


def toy(n: int, *, seed: int, num_classes: int = 3, channels: int = 1, size: int = 8, labels=None,
        random_labels: bool = False) -> ImageDataset:
    """``n`` random images; labels cycle through the classes, or are drawn at random after the
    images from the same generator (``random_labels``), or are given."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    if labels is None:
        labels = torch.randint(0, num_classes, (n,), generator=g) if random_labels else torch.arange(n) % num_classes
    return ImageDataset("toy", images, torch.as_tensor(labels, dtype=torch.int64),
                        tuple(f"c{i}" for i in range(num_classes)))
