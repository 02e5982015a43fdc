"""The in-memory dataset every part of the package holds, and what is made of one.

Every dataset is held the same way, whatever it came from (:mod:`.datasets` loads them): an
:class:`ImageDataset` with uint8 images ``N x C x H x W`` and int64 labels ``N``. From one come
its subsets (:meth:`ImageDataset.subset`, :func:`seeded_subset`), DARTS' two search halves
(:func:`search_split`), the union of two (:func:`concatenate`), resized copies (:func:`resized`),
the poisoned view (:meth:`ImageDataset.with_replacements`) and the per-channel statistics that
normalise its batches (:func:`channel_stats`; batches: :mod:`.batches`).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Sequence

import lazy_loader
import numpy as np
import torch
import torch.nn.functional as F

#: imported on first use (lazy_loader): scikit-learn takes ~0.5 s to import, and the CLI imports this module
sklearn = lazy_loader.load("sklearn")

logger = logging.getLogger(__name__)

_RESIZE_CHUNK = 1024  # images resized at once, to bound float memory
_STATS_CHUNK = 4096  # images summed at once in channel_stats


# --------------------------------------------------------------------------- the dataset


def _as_index_tensor(indices: object, name: str = "indices") -> torch.Tensor:
    """Any sequence / array / tensor of integers as a 1-D int64 CPU tensor."""
    idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if idx.dtype in (torch.bool,) or idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise ValueError(f"{name} must be integers, got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(idx.shape)}")
    return idx.to(device="cpu", dtype=torch.int64)


def _check_index_range(idx: torch.Tensor, n: int, name: str = "indices") -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        bad = idx[(idx < 0) | (idx >= n)][:5].tolist()
        raise IndexError(f"{name} must lie in [0, {n}), got out-of-range values {bad}")


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image classification dataset held in memory.

    ``images`` is uint8 ``N x C x H x W`` (contiguous), ``labels`` int64 ``N`` in
    ``[0, len(classes))``. Immutable by convention: every method returns a new dataset
    with its own tensors and never writes into this one.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor N x C x H x W, got "
                f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
            )
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise ValueError(
                f"labels must be an int64 tensor of shape N, got "
                f"{type(labels).__name__} {getattr(labels, 'dtype', '')} {tuple(getattr(labels, 'shape', ()))}"
            )
        if len(images) != len(labels):
            raise ValueError(f"images and labels must have the same length, got {len(images)} and {len(labels)}")
        classes = tuple(str(c) for c in self.classes)
        if not classes:
            raise ValueError("classes must name at least one class, got none")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise ValueError(
                f"labels must lie in [0, {len(classes)}) for {len(classes)} classes, "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )
        # Frozen dataclass: normalise the fields once, here, and never again.
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "images", images.detach().cpu().contiguous())
        object.__setattr__(self, "labels", labels.detach().cpu().contiguous())

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        c, h, w = self.shape_chw
        return f"ImageDataset(name={self.name!r}, n={len(self)}, shape_chw=({c}, {h}, {w}), classes={self.num_classes})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Image height (equal to the width for every built-in dataset)."""
        return int(self.images.shape[2])

    @property
    def shape_chw(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """The samples at ``indices`` (in that order) as a new dataset with freshly copied tensors."""
        idx = _as_index_tensor(indices)
        _check_index_range(idx, len(self))
        # index_select always allocates: the result never aliases self's storage.
        return ImageDataset(
            self.name, self.images.index_select(0, idx), self.labels.index_select(0, idx), self.classes
        )

    def with_replacements(
        self,
        indices: Sequence[int] | np.ndarray | torch.Tensor,
        images: torch.Tensor | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    ) -> ImageDataset:
        """The poisoned view: a new dataset equal to this one except at ``indices``.

        ``images`` (uint8, ``len(indices) x C x H x W``) and/or ``labels`` (integers in
        ``[0, num_classes)``, ``len(indices)`` of them) replace the samples there.
        ``indices`` must be unique and in range. This dataset is never modified.
        """
        if images is None and labels is None:
            raise ValueError("with_replacements needs images and/or labels to replace, got neither")
        idx = _as_index_tensor(indices)
        _check_index_range(idx, len(self))
        if torch.unique(idx).numel() != idx.numel():
            uniq, counts = torch.unique(idx, return_counts=True)
            raise ValueError(f"indices must be unique, got repeated values {uniq[counts > 1][:5].tolist()}")
        n_p = idx.numel()

        new_images = self.images
        if images is not None:
            images = torch.as_tensor(images)
            if images.dtype != torch.uint8:
                raise ValueError(f"images must be uint8 (pixel values 0..255), got dtype {images.dtype}")
            expected = (n_p, *self.shape_chw)
            if tuple(images.shape) != expected:
                raise ValueError(
                    f"images must have shape {expected} (len(indices) x C x H x W), got {tuple(images.shape)}"
                )
            new_images = self.images.clone()
            new_images[idx] = images.detach().cpu()

        new_labels = self.labels
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
                raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
            if tuple(labels.shape) != (n_p,):
                raise ValueError(f"labels must have shape ({n_p},) (one per index), got {tuple(labels.shape)}")
            labels = labels.detach().cpu().to(torch.int64)
            if n_p and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(
                    f"labels must lie in [0, {self.num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
                )
            new_labels = self.labels.clone()
            new_labels[idx] = labels

        # Unreplaced fields are shared with self; safe since neither side ever writes in place.
        return ImageDataset(self.name, new_images, new_labels, self.classes)

    def checksum(self) -> str:
        """SHA-256 (hex) of the image bytes, the label bytes (little-endian int64) and the name."""
        digest = hashlib.sha256()
        digest.update(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().astype("<i8").tobytes())
        digest.update(self.name.encode("utf-8"))
        return digest.hexdigest()


# --------------------------------------------------------------------------- resizing


def resized(ds: ImageDataset, size: int) -> ImageDataset:
    """``ds`` with every image resized to ``size`` x ``size`` (bilinear, antialiased, uint8)."""
    if ds.shape_chw[1:] == (size, size):
        return ds
    return ImageDataset(ds.name, _resize_uint8(ds.images, size), ds.labels, ds.classes)


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 NCHW images to size x size, rounded back to uint8."""
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


# --------------------------------------------------------------------------- splits and subsets


def search_split(ds: ImageDataset, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Split a training set in two halves as in DARTS: one trains the weights, one the architecture.

    A seeded permutation decides membership; the halves are disjoint, of sizes
    ``floor(n/2)`` and ``n - floor(n/2)``, each keeping the original sample order.
    """
    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    half = n // 2
    weights_idx, arch_idx = torch.sort(perm[:half]).values, torch.sort(perm[half:]).values
    return ds.subset(weights_idx), ds.subset(arch_idx)


def concatenate(first: ImageDataset, second: ImageDataset) -> ImageDataset:
    """Both datasets' samples in one (same classes and image shape required)."""
    if first.classes != second.classes or first.shape_chw != second.shape_chw:
        raise ValueError(f"cannot concatenate {first!r} and {second!r}: classes or image shapes differ")
    return ImageDataset(
        name=first.name,
        images=torch.cat([first.images, second.images]),
        labels=torch.cat([first.labels, second.labels]),
        classes=first.classes,
    )


def seeded_subset(ds: ImageDataset, size: int | None, seed: int) -> ImageDataset:
    """A seeded random subset of exactly ``size`` samples, stratified by class where possible.

    ``size`` None or >= len(ds) returns ``ds`` itself. Stratification falls back to plain
    random sampling when impossible (e.g. fewer samples asked for than classes present).
    """
    if size is None:
        return ds
    chosen = seeded_subset_indices(ds, size, seed)
    return ds if len(chosen) == len(ds) else ds.subset(chosen)


def seeded_subset_indices(ds: ImageDataset, size: int | None, seed: int) -> np.ndarray:
    """The sorted indices :func:`seeded_subset` takes (all of them for ``size`` None or >= n)."""
    if size is None:
        return np.arange(len(ds))
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be None or an int >= 1, got {size!r}")
    n = len(ds)
    if size >= n:
        return np.arange(n)
    everything = np.arange(n)
    try:
        chosen = sklearn.model_selection.train_test_split(
            everything, train_size=int(size), stratify=ds.labels.numpy(), random_state=seed
        )[0]
    except ValueError as err:
        logger.info("seeded_subset: stratified sampling impossible for size %d (%s); sampling at random", size, err)
        chosen = sklearn.model_selection.train_test_split(everything, train_size=int(size), random_state=seed)[0]
    return np.sort(chosen)


def channel_stats(ds: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of the images scaled to [0, 1]."""
    if len(ds) == 0:
        raise ValueError(f"channel_stats needs a non-empty dataset, got {ds.name!r} with 0 images")
    total = torch.zeros(ds.in_channels, dtype=torch.float64)
    total_sq = torch.zeros(ds.in_channels, dtype=torch.float64)
    for start in range(0, len(ds), _STATS_CHUNK):
        chunk = ds.images[start : start + _STATS_CHUNK].to(torch.float64) / 255.0
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = len(ds) * ds.shape_chw[1] * ds.shape_chw[2]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in var.sqrt())
