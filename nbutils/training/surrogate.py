"""The surrogate ResNet-18 and confidence-based label flipping (CLF, TMLR paper Algorithm 1).

CLF ranks every training sample by the surrogate's largest logit (most confident first) and
flips the labels of the top ``round(budget * n)`` to their least likely class. The surrogate
is a torchvision ResNet-18 adapted to small images (3x3 stride-1 stem, no max pool), the
usual CIFAR variant, trained from scratch on the clean training set.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.data import BatchLoader, ImageDataset, channel_stats
from ..core.progress import progress

log = logging.getLogger(__name__)


def resnet18_small(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 for small inputs: ``conv1`` is 3x3, stride 1, padding 1 over
    ``in_channels`` channels, and the stem's max pool is an identity."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
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
    cosine annealing over ``epochs``, random crop (padding 4) and flip when ``augment``.

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
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    start = time.perf_counter()
    for epoch in progress(range(epochs), desc="surrogate epochs"):
        model.train()
        total, correct, n = 0.0, 0, 0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
        schedule.step()
        log.info("surrogate epoch %d: loss %.3f acc %.3f", epoch + 1, total / n, correct / n)
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


def confidence_label_flip(
    dataset: ImageDataset, logits: torch.Tensor, budget: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLF (TMLR paper, Algorithm 1): which samples to flip, and to what.

    All ``n`` samples are ranked by their maximum logit, most confident first; ties go to the
    lower index. The top ``round(budget * n)`` are flipped to their least likely class, the
    arg-min of their logits (ties: the lowest class index).

    Degenerate logits: the arg-min can equal the sample's true label only when that label is
    (jointly) least likely, e.g. all logits equal, or the surrogate is confidently wrong in an
    extreme way. A flip must change the label, so the new label is the least likely class
    *among the classes other than the true label* (the next least likely class in that case;
    identical to the plain arg-min otherwise). Needs at least two classes.

    Returns ``(indices, new_labels)``: indices sorted ascending (the :class:`PoisonSet`
    convention), labels aligned with them.
    """
    n = len(dataset)
    logits = torch.as_tensor(logits)
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"logits must be N x K with N = {n} (one row per sample), got shape {tuple(logits.shape)}")
    if logits.shape[1] != dataset.num_classes:
        raise ValueError(f"logits must have one column per class ({dataset.num_classes}), got {logits.shape[1]}")
    if dataset.num_classes < 2:
        raise ValueError("label flipping needs at least two classes")
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    z = logits.detach().cpu().double().numpy()
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    count = int(round(budget * n))  # same rule as attacks.poison_count
    confidence = z.max(axis=1)
    order = np.lexsort((np.arange(n), -confidence))  # primary: confidence descending; then index
    chosen = np.sort(order[:count])
    masked = z[chosen].copy()
    true = dataset.labels.numpy()[chosen]
    masked[np.arange(count), true] = np.inf  # never "flip" to the true label
    new = masked.argmin(axis=1)  # first minimum: lowest class index on ties
    return torch.from_numpy(chosen.astype(np.int64)), torch.from_numpy(new.astype(np.int64))


def clf_poison_set(dataset: ImageDataset, logits: torch.Tensor, budget: float):
    """CLF as a :class:`PoisonSet` (label-only: no images), from the surrogate's logits on ``dataset``."""
    from ..core.poison_set import PoisonSet

    indices, labels = confidence_label_flip(dataset, logits, budget)
    return PoisonSet(indices=indices, labels=labels)
