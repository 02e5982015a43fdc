"""Figures and tables of the poisons themselves (TMLR paper, Figure 2).

:func:`poison_grid` shows the same randomly drawn samples (columns) as clean images, as each
poisoned variant, and as each variant's perturbation magnified to the visible range;
:func:`poison_figure` draws it for the report from a run's poison sets; :func:`flip_table`
counts label flips (old label x new label).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..core.image_dataset import ImageDataset
from ..core.poison_set import PoisonSet
from .names import LABEL_FLIPS, algorithm_name, attack_name
from .results import grid_datasets


def _as_uint8(images: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4:
        raise ValueError(f"{name} must be uint8 N x C x H x W, got {array.dtype} {array.shape}")
    return array


def _show(ax, chw: np.ndarray) -> None:
    """Show a C x H x W float image in [0, 1] (1 channel: grey; 3 channels: RGB)."""
    if chw.shape[0] == 1:
        ax.imshow(chw[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.transpose(chw[:3], (1, 2, 0)), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def magnify(delta: np.ndarray, eps: float) -> np.ndarray:
    """A perturbation in pixel units as a visible image: ``delta / (2 eps) + 0.5`` clipped to [0, 1]
    (grey is no change; black and white are ``-eps`` and ``+eps``)."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0 pixel units, got {eps}")
    return np.clip(delta / (2.0 * eps) + 0.5, 0.0, 1.0)


def poison_grid(
    clean_images: torch.Tensor | np.ndarray,
    variants: Mapping[str, torch.Tensor | np.ndarray],
    *,
    count: int = 6,
    seed: int = 0,
    eps: float = 16.0,
    magnify_perturbations: bool = True,
    labels: Sequence[str] | None = None,
) -> Figure:
    """A grid of ``count`` randomly drawn samples (same draw in every row, seeded).

    Rows: ``Clean``, then each variant (uint8 images of the *same* samples, same order as
    ``clean_images``), then, when ``magnify_perturbations``, each variant's perturbation
    shown by :func:`magnify` with bound ``eps`` (pixel units). ``labels`` optionally titles
    the columns. Works for 1- and 3-channel images. Returns a matplotlib ``Figure`` with
    ``(1 + 2 V) * count`` axes (``(1 + V) * count`` without the perturbation rows).
    """
    clean = _as_uint8(clean_images, "clean_images")
    arrays = {name: _as_uint8(images, f"variant {name!r}") for name, images in variants.items()}
    for name, array in arrays.items():
        if array.shape != clean.shape:
            raise ValueError(f"variant {name!r} has shape {array.shape}, the clean images {clean.shape}")
    if clean.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {clean.shape[1]}")
    count = min(int(count), len(clean))
    if count < 1:
        raise ValueError("poison_grid needs at least one image")
    chosen = np.sort(np.random.default_rng(seed).choice(len(clean), size=count, replace=False))

    rows: list[tuple[str, np.ndarray]] = [("Clean", clean[chosen].astype(np.float64) / 255.0)]
    rows += [(name, array[chosen].astype(np.float64) / 255.0) for name, array in arrays.items()]
    if magnify_perturbations:
        for name, array in arrays.items():
            delta = array[chosen].astype(np.float64) - clean[chosen].astype(np.float64)
            rows.append((f"{name} perturbation", magnify(delta, eps)))

    fig = Figure(figsize=(1.3 * count + 1.2, 1.3 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), count, squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c in range(count):
            ax = axes[r][c]
            _show(ax, images[c])
            if c == 0:
                ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
            if r == 0 and labels is not None:
                ax.set_title(str(labels[chosen[c]]), fontsize=9)
    return fig


def poison_figure(spec: dict, inputs: dict[str, str], load_pool: Callable[[dict], ImageDataset], count: int = 6):
    """TMLR Figure 2 from the report's spec and the poison sets of ``inputs``: the same randomly
    drawn search images clean and under every clean-label attack of the run at one budget, with
    each perturbation magnified; None without one. ``load_pool`` gives the clean search images of
    one of grid.yaml's datasets (the pipeline's ``search_pool``; called only when there is a figure
    to draw); a poison set stores the indices of its images in them."""
    data = grid_datasets(spec["settings"])[0]   # the primary dataset's poisons
    studies = [p for p in spec.get("poisons", [])
               if p["attack"] not in LABEL_FLIPS and p.get("dataset", data["dataset"]) == data["dataset"]]
    if not studies:
        return None
    budget = max(p["budget"] for p in studies)   # the largest: the same victims for every attack
    pool = load_pool(data)
    sets = {}
    for p in studies:
        if p["budget"] == budget:
            name = attack_name(p["attack"]) + (f" vs {algorithm_name(p['target'])}" if p.get("target") else "")
            sets[name] = PoisonSet.load(inputs[p["role"]], pool)
    common = sorted(set.intersection(*(set(s.indices.tolist()) for s in sets.values())))
    if not common:
        return None
    variants = {}
    for name, s in sets.items():
        row = {int(index): position for position, index in enumerate(s.indices)}
        variants[name] = s.images[[row[i] for i in common]]
    eps = max(s.header.get("eps") or 0 for s in sets.values())
    return poison_grid(pool.images[common], variants, count=count, eps=eps,
                       labels=[pool.classes[int(pool.labels[i])] for i in common])


def flip_table(
    old_labels: torch.Tensor | np.ndarray | Sequence[int],
    new_labels: torch.Tensor | np.ndarray | Sequence[int],
    classes: Sequence[str],
) -> pd.DataFrame:
    """Confusion matrix of label flips: rows the old label, columns the new one, cells the
    number of samples (every class appears, zeros included)."""
    old = np.asarray(old_labels.cpu() if isinstance(old_labels, torch.Tensor) else old_labels, dtype=np.int64)
    new = np.asarray(new_labels.cpu() if isinstance(new_labels, torch.Tensor) else new_labels, dtype=np.int64)
    if old.shape != new.shape or old.ndim != 1:
        raise ValueError(f"old_labels and new_labels must be 1-D of equal length, got {old.shape} and {new.shape}")
    k = len(classes)
    if old.size and (old.min() < 0 or new.min() < 0 or old.max() >= k or new.max() >= k):
        raise ValueError(f"labels must lie in [0, {k})")
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (old, new), 1)
    names = [str(c) for c in classes]
    return pd.DataFrame(
        counts,
        index=pd.Index(names, name="old label"),
        columns=pd.Index(names, name="new label"),
    )
