"""Defences behind one call: ``defend(poisoned, config) -> DefenseResult`` (defended dataset + record).

The TMLR paper's countermeasures (Table 4), applied between poisoning and search: the search
then runs on the defended dataset. Each defence lives in its own module:

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
from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal, Optional

import numpy as np
import torch
from pydantic import Field, StrictBool

from ..core.config import PositiveInt, PositiveNumber, Seed, config, integer, number
from ..core.data import ImageDataset, seeded_subset
from ..core.device import DEVICES, resolve_device
from .relabelling import EXTRACTORS, PRETRAINED_EXTRACTOR

log = logging.getLogger(__name__)

DEFENSES = ("sanitise", "relabel", "denoise")


#: the settings of each defence (the fields of :class:`DefenseConfig` besides ``name`` and ``seed``)
DEFENSE_SETTINGS: dict[str, tuple[str, ...]] = {
    "sanitise": ("fraction", "surrogate_epochs", "surrogate_batch_size", "surrogate_lr", "surrogate_augment"),
    "relabel": ("extractor", "extractor_weights", "extractor_image_size", "allow_fallback", "kmeans_restarts"),
    "denoise": ("sigma", "ddpm_path", "ddpm_trusted_size", "ddpm_epochs", "ddpm_batch_size", "ddpm_lr", "ddpm_width",
                "ddpm_timesteps", "ddpm_train_near_sigma", "denoise_batch_size"),
}

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

    name: Literal[DEFENSES]  # type: ignore[valid-type]
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


@dataclass
class DefenseResult:
    """The defended dataset, a JSON-plain record of what was done and how well, and per-sample
    arrays (numpy; for an ``.npz`` beside the record)."""

    dataset: ImageDataset
    record: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


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
    if config.name == "relabel" and n < poisoned.num_classes:
        raise ValueError(f"relabelling needs at least one sample per cluster ({poisoned.num_classes}), got {n} samples")
    if config.name == "relabel" and poisoned.num_classes < 2:
        raise ValueError("relabelling needs at least two classes")
    if config.name == "denoise":
        _check_denoise_inputs(poisoned, config, trusted)
    if config.name == "sanitise":
        from .sanitisation import drop_counts

        drop_counts(poisoned.labels.numpy(), poisoned.num_classes, config.fraction)  # raises if a class would vanish
    return labels, images, indices


def _check_denoise_inputs(poisoned: ImageDataset, config: DefenseConfig, trusted: ImageDataset | None) -> None:
    if config.ddpm_path is not None:
        return  # the folder and the model's fit are checked when loading, still before denoising
    if trusted is None:
        raise ValueError(
            "denoising without ddpm_path trains a small DDPM on clean images the defender holds out: "
            "pass trusted=<clean ImageDataset>, or give ddpm_path: <local diffusers DDPM folder>"
        )
    if not isinstance(trusted, ImageDataset):
        raise ValueError(f"trusted must be an ImageDataset, got {type(trusted).__name__}")
    if trusted.shape_chw != poisoned.shape_chw:
        raise ValueError(f"trusted images must have the poisoned images' shape {poisoned.shape_chw}, got {trusted.shape_chw}")
    if len(trusted) < config.ddpm_trusted_size:
        raise ValueError(
            f"ddpm_trusted_size is {config.ddpm_trusted_size}, but trusted holds only {len(trusted)} images; "
            f"lower ddpm_trusted_size or hold out more clean images"
        )
    c, h, w = poisoned.shape_chw
    if h != w or h % 2:
        raise ValueError(f"the small DDPM needs square images of even size, got {h}x{w}")
    from .denoising import ddpm_scheduler, timestep_for_sigma

    timestep_for_sigma(ddpm_scheduler(config.ddpm_timesteps).alphas_cumprod, config.sigma)  # reachable noise level


# --------------------------------------------------------------------------- the defences


def _sanitise(poisoned, config, device, clean_labels, clean_images, poison_indices, trusted) -> DefenseResult:
    from .sanitisation import filter_quality, sanitise

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


def _relabel(poisoned, config, device, clean_labels, clean_images, poison_indices, trusted) -> DefenseResult:
    from .relabelling import agreement, best_matching, relabel

    out = relabel(
        poisoned, extractor=config.extractor, allow_fallback=config.allow_fallback, weights_path=config.extractor_weights,
        image_size=config.extractor_image_size, seed=config.seed, device=device, n_init=config.kmeans_restarts,
    )
    new_labels = out["labels"]
    k = poisoned.num_classes
    record = {
        "extractor": out["extractor"],
        "extractor_source": out["extractor_source"],
        "fallback_used": out["extractor"] != config.extractor,
        "fallback_reason": out["fallback_reason"],
        "features_dim": out["features_dim"],
        "clusters": k,
        "vs_given_labels": agreement(out["cluster_ids"], poisoned.labels.numpy(), k),
        "labels_changed": int((new_labels != poisoned.labels.numpy()).sum()),
    }
    if clean_labels is not None:
        # Scored up to the numbering of the clusters, which does not matter for training.
        record["vs_clean_labels"] = agreement(out["cluster_ids"], clean_labels, k)
        record["given_labels_vs_clean"] = float((poisoned.labels.numpy() == clean_labels).mean())
        if poison_indices is not None and poison_indices.size:
            as_clean = best_matching(out["cluster_ids"], clean_labels, k)[out["cluster_ids"]]
            record["poisons_clean_class_recovered"] = float(
                (as_clean[poison_indices] == clean_labels[poison_indices]).mean()
            )
    defended = ImageDataset(poisoned.name, poisoned.images, torch.from_numpy(new_labels), poisoned.classes)
    return DefenseResult(defended, record, {"labels": new_labels, "cluster_ids": out["cluster_ids"]})


def _denoise(poisoned, config, device, clean_labels, clean_images, poison_indices, trusted) -> DefenseResult:
    from .denoising import check_model_fits, ddpm_scheduler, load_pretrained_ddpm, noise_ratio, one_shot_denoise
    from .denoising import perturbation_removed, timestep_for_sigma, train_ddpm

    if config.ddpm_path is not None:
        unet, scheduler = load_pretrained_ddpm(config.ddpm_path)
        check_model_fits(unet, poisoned.shape_chw)
        timestep_for_sigma(scheduler.alphas_cumprod, config.sigma)  # a sigma the schedule cannot reach: fail now
        ddpm = {"source": "pretrained", "path": config.ddpm_path}
    else:
        held_out = seeded_subset(trusted, config.ddpm_trusted_size, seed=config.seed)
        step = timestep_for_sigma(ddpm_scheduler(config.ddpm_timesteps).alphas_cumprod, config.sigma)
        top = min(2 * step, config.ddpm_timesteps - 1) if config.ddpm_train_near_sigma else config.ddpm_timesteps - 1
        unet, scheduler, history = train_ddpm(
            held_out.images, epochs=config.ddpm_epochs, batch_size=config.ddpm_batch_size, lr=config.ddpm_lr,
            width=config.ddpm_width, num_train_timesteps=config.ddpm_timesteps, max_timestep=top, seed=config.seed,
            device=device,
        )
        ddpm = {
            "source": "trained here on clean images held out by the defender (no pretrained DDPM given)",
            "trusted_dataset": trusted.name, "trusted_images": len(held_out), "epochs": config.ddpm_epochs,
            "width": config.ddpm_width, "timesteps": config.ddpm_timesteps, "trained_timesteps": [0, top],
            "final_noise_mse": history[-1],
        }
    denoised, t = one_shot_denoise(
        poisoned.images, unet, scheduler, config.sigma, seed=config.seed, device=device, batch_size=config.denoise_batch_size,
    )
    change = (denoised.double() - poisoned.images.double()) / 255.0
    record = {
        "sigma": config.sigma,
        "ddpm": ddpm,
        "timestep": t,
        "noise_ratio_at_timestep": float(noise_ratio(scheduler.alphas_cumprod)[t]),
        "mean_squared_change": float(change.square().mean()),  # per pixel, images in [0, 1]
        "mean_squared_noise_added": config.sigma ** 2,  # what a denoiser that removed nothing would leave
    }
    arrays: dict[str, np.ndarray] = {}
    if clean_images is not None:
        to_clean = (denoised.double() - clean_images.double()) / 255.0
        record["mean_squared_error_to_clean_before"] = float(((poisoned.images.double() - clean_images.double()) / 255.0).square().mean())
        record["mean_squared_error_to_clean_after"] = float(to_clean.square().mean())
        if poison_indices is not None and poison_indices.size:
            idx = torch.from_numpy(poison_indices)
            removed = perturbation_removed(poisoned.images[idx], denoised[idx], clean_images[idx])
            arrays["perturbation_removed"] = removed
            defined = removed[np.isfinite(removed)]
            record["perturbation_removed"] = {
                "poisons_with_perturbation": int(defined.size),
                "mean": float(defined.mean()) if defined.size else None,
                "median": float(np.median(defined)) if defined.size else None,
            }
    defended = ImageDataset(poisoned.name, denoised, poisoned.labels, poisoned.classes)
    return DefenseResult(defended, record, arrays)


_DEFENCES = {"sanitise": _sanitise, "relabel": _relabel, "denoise": _denoise}


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
    result = _DEFENCES[config.name](poisoned, config, device, labels, images, indices, trusted)
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
