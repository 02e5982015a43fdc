"""Loss-based sanitisation: drop, per class, the samples a classifier fits worst.

Koh, Steinhardt and Liang (2021), *Stronger data poisoning attacks break data sanitization
defenses*, as the TMLR paper applies it (Table 4): train a ResNet-18 on the whole poisoned
training set, compute every sample's training loss (cross-entropy of the trained model, in
eval mode, without augmentation), and discard the given fraction (50% in the paper) of each
class with the highest loss. The intuition: poisons differ from clean data, so the model fits
them worse. Classes are those of the labels the defender holds, i.e. the poisoned labels.

Before the losses are computed, the BatchNorm running statistics are re-estimated on the
training set at the final weights (one pass, no gradients): the running averages kept during
training mix in the early weights, and after a short training (a few dozen steps, as at the
quick preset's scale) they made eval-mode losses meaningless (thousands, on a 60-image test
set where re-estimated statistics give clean samples ~0.01 and mislabelled ones 3 to 40).

Per class ``c`` with ``n_c`` samples, ``floor(fraction * n_c + 1/2)`` samples are dropped
(nearest integer, halves up); equal losses go to the lower index first. A fraction that would
drop every sample of a class is refused (:func:`drop_counts`), before any training.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..core.batches import BatchLoader
from ..core.image_dataset import ImageDataset, channel_stats
from ..training.surrogate import surrogate_logits, train_surrogate
from .result import DefenseResult

log = logging.getLogger(__name__)


def drop_counts(labels: np.ndarray, num_classes: int, fraction: float) -> np.ndarray:
    """How many samples to drop from each class: ``floor(fraction * n_c + 1/2)``.

    Raises ValueError when that is every sample of a class that has any.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1) (the share of each class to drop), got {fraction!r}")
    sizes = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    counts = np.floor(fraction * sizes + 0.5).astype(np.int64)
    emptied = np.flatnonzero((sizes > 0) & (counts >= sizes))
    if emptied.size:
        detail = ", ".join(f"class {c} ({sizes[c]} samples)" for c in emptied[:5])
        raise ValueError(
            f"sanitisation with fraction {fraction} would remove every sample of {detail}; "
            f"use a smaller fraction or more data per class"
        )
    return counts


def highest_loss_per_class(losses: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The indices (sorted) of the ``counts[c]`` highest-loss samples of each class ``c``;
    equal losses: lower index first."""
    losses = np.asarray(losses, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if losses.shape != labels.shape:
        raise ValueError(f"losses and labels must have one shape, got {losses.shape} and {labels.shape}")
    dropped = []
    for c, k in enumerate(counts):
        members = np.flatnonzero(labels == c)
        if k == 0 or members.size == 0:
            continue
        order = np.lexsort((members, -losses[members]))  # loss descending, then index ascending
        dropped.append(members[order[:k]])
    return np.sort(np.concatenate(dropped)) if dropped else np.zeros(0, dtype=np.int64)


def filter_quality(dropped: np.ndarray, poison_indices: np.ndarray) -> dict:
    """Precision (share of dropped samples that are poisons) and recall (share of poisons
    dropped) of the filter; None where the ratio is undefined."""
    dropped_set = set(np.asarray(dropped).tolist())
    poisons = set(np.asarray(poison_indices).tolist())
    caught = len(dropped_set & poisons)
    return {
        "poisons": len(poisons),
        "poisons_dropped": caught,
        "precision": caught / len(dropped_set) if dropped_set else None,
        "recall": caught / len(poisons) if poisons else None,
    }


@torch.no_grad()
def reestimate_batch_norm(model: torch.nn.Module, dataset: ImageDataset, mean, std, device, batch_size: int = 256) -> None:
    """Replace every BatchNorm layer's running statistics by their average over ``dataset`` at the
    model's final weights (one forward pass in train mode, no gradients, no augmentation)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches of this pass
    model.train()
    for x, _ in BatchLoader(dataset, batch_size, shuffle=False, seed=0, mean=mean, std=std, device=device):
        model(x)
    for m, momentum in zip(layers, saved):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def training_losses(model: torch.nn.Module, dataset: ImageDataset, mean, std, device) -> np.ndarray:
    """Cross-entropy of ``model`` (eval mode, no augmentation) on every sample, in order."""
    logits = surrogate_logits(model, dataset, mean, std, device)
    return F.cross_entropy(logits, dataset.labels, reduction="none").double().numpy()


def sanitise(
    dataset: ImageDataset,
    fraction: float,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    augment: bool,
    seed: int,
    device: str | torch.device,
) -> dict:
    """Train the defender's ResNet-18 on ``dataset`` and choose, per class, the ``fraction`` of
    samples with the highest training loss.

    Returns ``{"kept": sorted indices, "dropped": sorted indices, "losses": per-sample loss,
    "drop_counts": per class}`` (numpy arrays). ``dataset`` is not modified.
    """
    labels = dataset.labels.numpy()
    counts = drop_counts(labels, dataset.num_classes, fraction)  # refuses before any training
    mean, std = channel_stats(dataset)
    model = train_surrogate(
        dataset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, augment=augment,
        mean=mean, std=std,
    )
    reestimate_batch_norm(model, dataset, mean, std, device)
    losses = training_losses(model, dataset, mean, std, device)
    dropped = highest_loss_per_class(losses, labels, counts)
    kept = np.setdiff1d(np.arange(len(dataset)), dropped)
    log.info(
        "sanitisation: dropped %d of %d samples (fraction %.2f per class); mean loss kept %.3f, dropped %.3f",
        len(dropped), len(dataset), fraction, losses[kept].mean(), losses[dropped].mean() if len(dropped) else math.nan,
    )
    return {"kept": kept, "dropped": dropped, "losses": losses, "drop_counts": counts}


# --------------------------------------------------------------------------- the defence


def check_sanitise(poisoned: ImageDataset, config, trusted: ImageDataset | None) -> None:
    """Refuse, before any compute, a fraction that would drop a whole class."""
    drop_counts(poisoned.labels.numpy(), poisoned.num_classes, config.fraction)


def sanitise_defense(poisoned: ImageDataset, config, device, clean_labels, clean_images, poison_indices,
                     trusted) -> DefenseResult:
    """The ``sanitise`` defence of :func:`nbutils.defenses.defending.defend`: :func:`sanitise`
    with ``config``'s settings; the record scores the filter against the poison indices."""
    out = sanitise(
        poisoned, config.fraction, epochs=config.surrogate_epochs, batch_size=config.surrogate_batch_size,
        lr=config.surrogate_lr, augment=config.surrogate_augment, seed=config.seed, device=device,
    )
    kept, dropped, losses = out["kept"], out["dropped"], out["losses"]
    record = {
        "fraction": config.fraction,
        "surrogate": {"model": "resnet18_small", "epochs": config.surrogate_epochs, "batch_size": config.surrogate_batch_size,
                      "lr": config.surrogate_lr, "augment": config.surrogate_augment},
        "dropped": int(len(dropped)),
        "dropped_per_class": out["drop_counts"].tolist(),
        "mean_loss_kept": float(losses[kept].mean()),
        "mean_loss_dropped": float(losses[dropped].mean()) if len(dropped) else None,
    }
    if poison_indices is not None:
        record["filter"] = filter_quality(dropped, poison_indices)
    if clean_labels is not None:
        wrong = poisoned.labels.numpy() != clean_labels
        record["wrong_labels_before"] = int(wrong.sum())
        record["wrong_labels_after"] = int(wrong[kept].sum())
    arrays = {"kept_indices": kept, "dropped_indices": dropped, "losses": losses}
    return DefenseResult(poisoned.subset(kept), record, arrays)
