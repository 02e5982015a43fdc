"""Defences behind one call: ``defend(poisoned, config) -> DefenseResult`` (defended dataset + record).

The TMLR paper's countermeasures (Table 4), applied between poisoning and search: the search
then runs on the defended dataset. Each defence is one record of :mod:`.registry` (its
settings, input check and function) and lives in its own module:

* ``sanitise``: loss-based sanitisation (Koh et al., 2021), :mod:`nbutils.defenses.sanitisation`. A
  ResNet-18 trained on the poisoned set; per class the ``fraction`` (paper: 0.5) of samples
  with the highest training loss are dropped. The defended set is *smaller*; the record's
  arrays hold the kept indices (rows of the defended set -> rows of the input).
* ``relabel``: cluster-based relabelling (the paper's own), :mod:`nbutils.defenses.relabelling`.
  Features of an ImageNet-pretrained ResNet-152 (or, where allowed, the documented fallback),
  K-Means with one cluster per class, cluster ids as labels. Images unchanged.
* ``denoise``: diffusion denoising (Hong et al., 2024), :mod:`nbutils.defenses.denoising`. One-shot
  x0 prediction of a DDPM at noise level ``sigma`` (paper: 0.1); a pretrained DDPM from a local
  folder, otherwise a small DDPM trained here on a clean, trusted set the defender holds out
  (the ``trusted`` argument). Labels unchanged; images re-quantised to uint8.

What the defender does not know but the audit does (the clean labels and images, the poison
indices) is passed separately and used only to score the defence in the record: precision and
recall of the filter, agreement of the new labels with the clean ones, how much of each
perturbation the denoiser removed. Every argument is checked before any compute.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Annotated, Literal, Optional

import numpy as np
import torch
from pydantic import Field, StrictBool

from ..core.config import PositiveInt, PositiveNumber, Seed, config, integer, number
from ..core.image_dataset import ImageDataset
from ..core.device import DEVICES, resolve_device
from .registry import DEFENSES
from .relabelling import EXTRACTORS, PRETRAINED_EXTRACTOR
from .result import DefenseResult

log = logging.getLogger(__name__)

#: a path to a local file or folder (``None``: not given)
LocalPath = Optional[Annotated[str, Field(min_length=1)]]


@config
class DefenseConfig:
    """One defence and its settings: what :func:`defend` runs with. Only the fields of the
    chosen ``name`` are used.

    Defaults are the paper's where it gives them (fraction 0.5, sigma 0.1, ResNet-152); the
    training settings of the defender's own networks are not in the paper and are ours.
    Switches take ``true`` or ``false`` only (a YAML ``"yes"`` string is refused, not read as true).
    """

    name: Literal[tuple(DEFENSES)]  # type: ignore[valid-type]
    seed: Seed = 0
    # sanitise: the defender's ResNet-18 and the share of each class to drop
    fraction: number(gt=0, lt=1) = 0.5
    surrogate_epochs: PositiveInt = 40
    surrogate_batch_size: PositiveInt = 128
    surrogate_lr: PositiveNumber = 0.1
    surrogate_augment: StrictBool = True
    # relabel: feature extractor and K-Means
    extractor: Literal[EXTRACTORS] = PRETRAINED_EXTRACTOR  # type: ignore[valid-type]
    extractor_weights: LocalPath = None       # local ResNet-152 state dict; None: the torch hub cache
    extractor_image_size: integer(32) = 224   # images are resized to this for the ImageNet network
    allow_fallback: StrictBool = False        # use the fallback extractor if the pretrained one is missing
    kmeans_restarts: PositiveInt = 10
    # denoise: noise level and the DDPM
    sigma: number(gt=0, le=1) = 0.1           # noise level on [0, 1] images
    ddpm_path: LocalPath = None               # local diffusers DDPM folder; None: train one on trusted images
    ddpm_trusted_size: PositiveInt = 1000     # clean held-out images the small DDPM is trained on
    ddpm_epochs: PositiveInt = 50
    ddpm_batch_size: PositiveInt = 64
    ddpm_lr: PositiveNumber = 1e-3
    ddpm_width: integer(8, multiple_of=8) = 32   # the U-Net's group norms have 8 groups
    ddpm_timesteps: integer(2) = 1000         # length of the DDPM's linear noise schedule
    ddpm_train_near_sigma: StrictBool = True  # train on timesteps 0..2t only (t: the denoising step)
    denoise_batch_size: PositiveInt = 256


# --------------------------------------------------------------------------- input checks


def _check_inputs(
    poisoned: ImageDataset,
    config: DefenseConfig,
    clean_labels,
    clean_images,
    poison_indices,
    trusted: ImageDataset | None,
) -> tuple[np.ndarray | None, torch.Tensor | None, np.ndarray | None]:
    if not isinstance(poisoned, ImageDataset):
        raise ValueError(f"poisoned must be an ImageDataset, got {type(poisoned).__name__}")
    if not isinstance(config, DefenseConfig):
        raise ValueError(f"config must be a DefenseConfig, got {type(config).__name__}")
    n = len(poisoned)
    if n == 0:
        raise ValueError("poisoned must hold at least one sample, got an empty dataset")
    labels = None
    if clean_labels is not None:
        labels = np.asarray(torch.as_tensor(clean_labels).cpu())
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"clean_labels must be {n} integers (one per sample), got {labels.dtype} {labels.shape}")
        if labels.min() < 0 or labels.max() >= poisoned.num_classes:
            raise ValueError(f"clean_labels must lie in [0, {poisoned.num_classes}), got [{labels.min()}, {labels.max()}]")
        labels = labels.astype(np.int64)
    images = None
    if clean_images is not None:
        images = torch.as_tensor(clean_images)
        if images.dtype != torch.uint8 or tuple(images.shape) != tuple(poisoned.images.shape):
            raise ValueError(
                f"clean_images must be uint8 of the poisoned images' shape {tuple(poisoned.images.shape)}, "
                f"got {images.dtype} {tuple(images.shape)}"
            )
    indices = None
    if poison_indices is not None:
        indices = np.asarray(torch.as_tensor(poison_indices).cpu())
        if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
            raise ValueError(f"poison_indices must be a 1-D sequence of integers, got {indices.dtype} {indices.shape}")
        indices = indices.astype(np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise ValueError(f"poison_indices must lie in [0, {n}), got [{indices.min()}, {indices.max()}]")
        if np.unique(indices).size != indices.size:
            raise ValueError("poison_indices must be unique, got repeated values")
    DEFENSES[config.name].check(poisoned, config, trusted)
    return labels, images, indices


def defend(
    poisoned: ImageDataset,
    config: DefenseConfig,
    *,
    device: str | torch.device = "cpu",
    clean_labels=None,
    clean_images=None,
    poison_indices=None,
    trusted: ImageDataset | None = None,
) -> DefenseResult:
    """Apply the defence of ``config`` to ``poisoned`` (never modified).

    ``trusted``: clean images the defender holds out (needed by ``denoise`` without a
    ``ddpm_path``). ``clean_labels``, ``clean_images`` (aligned with ``poisoned``) and
    ``poison_indices`` are the audit's knowledge, used only to score the defence in the record.
    ``trusted`` should not overlap ``poisoned``: the runner can pass clean training images
    outside the search subset. ``device``: ``auto``, ``cpu``, ``cuda`` or a torch device.
    """
    device = resolve_device(device) if isinstance(device, str) and device in DEVICES else torch.device(device)
    labels, images, indices = _check_inputs(poisoned, config, clean_labels, clean_images, poison_indices, trusted)
    start = time.perf_counter()
    result = DEFENSES[config.name].apply(poisoned, config, device, labels, images, indices, trusted)
    result.record = {
        "defense": config.name,
        "config": asdict(config),
        "dataset": poisoned.name,
        "samples_in": len(poisoned),
        "samples_out": len(result.dataset),
        **result.record,
        "seconds": time.perf_counter() - start,
    }
    log.info("defence %s: %d -> %d samples in %.1f s", config.name, len(poisoned), len(result.dataset), result.record["seconds"])
    return result
