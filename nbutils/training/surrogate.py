"""The small-image ResNet-18 trained from scratch on clean or poisoned data: CLF's surrogate
(the attacker ranks samples by its confidence, :mod:`nbutils.attacks.confidence_flip`) and the
sanitisation defender's classifier (:mod:`nbutils.defenses.sanitisation`).

The network is torchvision's ResNet-18 adapted to small images (3x3 stride-1 stem, no max
pool), the usual CIFAR variant; it is trained by the shared loop
(:func:`nbutils.training.loop.train_supervised`).
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch
from torch import nn

from ..core import deferred_imports
from ..core.batches import BatchLoader
from ..core.image_dataset import ImageDataset, channel_stats
from .loop import train_supervised
from .recipe import TrainingRecipe


log = logging.getLogger(__name__)


def resnet18_small(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 for small inputs: ``conv1`` is 3x3, stride 1, padding 1 over
    ``in_channels`` channels, and the stem's max pool is an identity."""
    model = deferred_imports.torchvision().models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits conv1
    model.maxpool = nn.Identity()
    return model


def train_surrogate(
    dataset: ImageDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str | torch.device,
    augment: bool = True,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Train :func:`resnet18_small` on ``dataset``: SGD (momentum 0.9, weight decay 5e-4),
    cosine annealing to 0 over ``epochs``, no gradient clipping, random crop (padding 4) and
    flip when ``augment``; a non-finite loss stops it with an error naming the epoch.

    Inputs are normalised by ``(mean, std)``, by default :func:`channel_stats` of ``dataset``;
    pass the same values to :func:`surrogate_logits`. Returns the model in eval mode.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    if mean is None or std is None:
        mean, std = channel_stats(dataset)
    torch.manual_seed(seed)
    model = resnet18_small(dataset.num_classes, dataset.in_channels).to(device)
    loader = BatchLoader(dataset, batch_size, shuffle=True, seed=seed, augment=augment, mean=mean, std=std, device=device)
    recipe = TrainingRecipe(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, grad_clip=None)
    start = time.perf_counter()
    train_supervised(model, loader, recipe, name="surrogate")
    log.info("surrogate trained in %.1f s", time.perf_counter() - start)
    return model.eval()


@torch.no_grad()
def surrogate_logits(
    model: nn.Module,
    dataset: ImageDataset,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """The model's logits (eval mode, no augmentation) for every sample in order: ``N x K`` on the CPU."""
    model.eval()
    loader = BatchLoader(dataset, batch_size, shuffle=False, seed=0, mean=mean, std=std, device=device)
    out = []
    for x, _ in loader:
        logits = model(x)
        logits = logits[0] if isinstance(logits, tuple) else logits
        out.append(logits.float().cpu())
    return torch.cat(out)

