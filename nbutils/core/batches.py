"""Batches for training and search: :class:`BatchLoader` turns an
:class:`~nbutils.core.image_dataset.ImageDataset` into float batches in [0, 1], normalised per
channel, optionally augmented, on the requested device."""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .image_dataset import ImageDataset, channel_stats


class BatchLoader:
    """Iterate float batches in [0, 1] normalised by (mean, std), optionally augmented, on a device.

    Each pass (epoch) draws its shuffling and augmentation from a ``torch.Generator`` seeded
    with ``seed + epoch``, so two loaders built alike yield exactly the same batches.
    Augmentation is torchvision-style ``RandomCrop(padding=crop_padding)`` (zero padding in
    pixel space, before normalisation) plus a horizontal flip with probability 0.5, done
    for the whole batch at once by gathering through per-sample index grids.
    """

    def __init__(
        self,
        ds: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        augment: bool = False,
        crop_padding: int = 4,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        if len(ds) == 0:
            raise ValueError(f"ds must hold at least one image, got {ds.name!r} with 0 images")
        if mean is None or std is None:
            default_mean, default_std = channel_stats(ds)
            mean = default_mean if mean is None else mean
            std = default_std if std is None else std
        channels = ds.in_channels
        if len(mean) != channels:
            raise ValueError(f"mean must have one value per channel ({channels}), got {tuple(mean)}")
        if len(std) != channels or any(not s > 0 for s in std):
            raise ValueError(f"std must have {channels} positive values (one per channel), got {tuple(std)}")

        self.ds = ds
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.augment = augment
        self.crop_padding = crop_padding
        self.flip = True  # test seam: set False to check the crop alone
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.epoch = 0
        self._images = ds.images.to(self.device)
        self._labels = ds.labels.to(self.device)
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        n = len(self.ds)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        n = len(self.ds)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size].to(self.device)
            x = self._images.index_select(0, idx).float().div_(255.0)
            if self.augment:
                x = self._augment(x, generator)
            x = (x - self._mean) / self._std
            yield x, self._labels.index_select(0, idx)

    def _augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop with zero padding and random horizontal flip, for the whole batch at once."""
        b, _, h, w = x.shape
        p = self.crop_padding
        padded = F.pad(x, (p, p, p, p)) if p else x  # zeros in pixel space, i.e. black
        top = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        left = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        flip = torch.rand(b, generator=generator) < 0.5
        if not self.flip:
            flip = torch.zeros_like(flip)
        rows = top[:, None] + torch.arange(h)[None, :]  # b x h
        cols_forward = torch.arange(w)[None, :].expand(b, w)
        cols = left[:, None] + torch.where(flip[:, None], (w - 1) - cols_forward, cols_forward)  # b x w
        rows, cols = rows.to(x.device), cols.to(x.device)
        batch_idx = torch.arange(b, device=x.device)[:, None, None]
        # Advanced indices split by the channel slice: the result is b x h x w x C.
        out = padded[batch_idx, :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()
