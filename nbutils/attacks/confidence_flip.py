"""Confidence-based label flipping (CLF, TMLR paper Algorithm 1).

CLF ranks every training sample by a surrogate classifier's largest logit (most confident
first) and flips the labels of the top ``round(budget * n)`` to their least likely class. The
surrogate (a small-image ResNet-18 trained on the clean data) and its logits come from
:mod:`nbutils.training.surrogate`; this module only turns logits into flips.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.image_dataset import ImageDataset
from ..core.poison_set import PoisonSet, poison_count


def clf_flips(dataset: ImageDataset, logits: torch.Tensor, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CLF's choice: which samples to flip, and to what.

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
    count = poison_count(n, budget)
    confidence = z.max(axis=1)
    order = np.lexsort((np.arange(n), -confidence))  # primary: confidence descending; then index
    chosen = np.sort(order[:count])
    masked = z[chosen].copy()
    true = dataset.labels.numpy()[chosen]
    masked[np.arange(count), true] = np.inf  # never "flip" to the true label
    new = masked.argmin(axis=1)  # first minimum: lowest class index on ties
    return torch.from_numpy(chosen.astype(np.int64)), torch.from_numpy(new.astype(np.int64))


def clf_poison_set(dataset: ImageDataset, logits: torch.Tensor, budget: float) -> PoisonSet:
    """CLF as a :class:`PoisonSet` (label-only: no images), from the surrogate's logits on ``dataset``."""
    indices, labels = clf_flips(dataset, logits, budget)
    return PoisonSet(indices=indices, labels=labels)
