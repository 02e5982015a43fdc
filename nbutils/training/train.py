"""Retraining: the evaluation network built from a genotype, trained from scratch on clean data.

One training loop for every architecture, with the P-DARTS training recipe (``train_cifar.py``):
SGD with momentum and cosine annealing to 0, gradient clipping, auxiliary loss, drop path
ramped linearly over the epochs, random crop and flip, cutout. On CUDA, optionally mixed
precision (float16 autocast with a gradient scaler) and channels_last activations.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.data import BatchLoader, ImageDataset, channel_stats
from ..core.device import MixedPrecision
from ..space.genotype import Genotype
from ..space.network import EvalNetwork, count_parameters
from ..core.progress import progress

log = logging.getLogger(__name__)


@dataclass
class RetrainConfig:
    epochs: int = 600
    channels: int = 36
    layers: int = 20
    batch_size: int = 128
    lr: float = 0.025
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path: float = 0.3
    cutout: int = 16
    augment: bool = True
    mixed_precision: bool = False   # float16 autocast + gradient scaling, on CUDA only (ignored elsewhere)
    channels_last: bool = False     # NHWC activations (faster convolutions on recent GPUs)


def cutout(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one square per image, rows ``[cy - length//2, cy + length//2)`` (likewise columns)
    around a uniformly drawn centre, clipped at the border: DARTS' ``Cutout``, applied as
    there to the normalised image."""
    n, _, h, w = x.shape
    cy = torch.randint(h, (n, 1, 1), generator=generator).to(x.device)
    cx = torch.randint(w, (n, 1, 1), generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    half = length // 2
    inside = (rows >= cy - half) & (rows < cy + half) & (cols >= cx - half) & (cols < cx + half)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def evaluate(model: torch.nn.Module, loader: BatchLoader) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of a network on every sample of ``loader``."""
    model.eval()
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else out
            correct += (logits.argmax(1) == y).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            n += len(y)
    return correct / n, loss / n


def retrain(
    genotype: Genotype,
    train_set: ImageDataset,
    test_set: ImageDataset,
    config: RetrainConfig,
    *,
    seed: int,
    device: torch.device,
) -> dict:
    """Train the genotype's network from scratch and return its test accuracy and training curve."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = EvalNetwork(
        genotype,
        channels=config.channels,
        num_classes=train_set.num_classes,
        layers=config.layers,
        auxiliary=config.auxiliary,
        in_channels=train_set.in_channels,
        input_size=train_set.images.shape[-1],
    ).to(device)
    precision = MixedPrecision.for_device(config.mixed_precision, device, "training")
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    scaler = precision.scaler()
    mean, std = channel_stats(train_set)
    train_loader = BatchLoader(train_set, config.batch_size, shuffle=True, seed=seed, augment=config.augment, mean=mean, std=std, device=device)
    test_loader = BatchLoader(test_set, 256, shuffle=False, seed=seed, mean=mean, std=std, device=device)
    opt = torch.optim.SGD(model.parameters(), config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.epochs, eta_min=config.lr_min)

    curve = []
    start = time.perf_counter()
    for epoch in progress(range(config.epochs), desc="retrain epochs"):
        model.train()
        model.drop_path_prob = config.drop_path * epoch / config.epochs
        total_loss, correct, n = 0.0, 0, 0
        for x, y in train_loader:
            if config.cutout > 0:
                x = cutout(x, config.cutout, generator)
            opt.zero_grad(set_to_none=True)
            with precision.autocast():
                logits, aux = model(x.contiguous(memory_format=layout))
                loss = F.cross_entropy(logits, y)
                if aux is not None:
                    loss = loss + config.auxiliary_weight * F.cross_entropy(aux, y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)   # clip the true gradients
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(opt)
            scaler.update()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
        schedule.step()
        curve.append({"epoch": epoch + 1, "train_loss": total_loss / n, "train_acc": correct / n})
        log.info("epoch %d: train loss %.3f acc %.3f", epoch + 1, total_loss / n, correct / n)
    test_acc, test_loss = evaluate(model, test_loader)
    return {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "curve": curve,
        "parameters": count_parameters(model, exclude_auxiliary=True),
        "seconds": time.perf_counter() - start,
        "mixed_precision": precision.enabled,
        "channels_last": config.channels_last,
        "model": model,
    }
