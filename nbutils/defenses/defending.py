"""Defences behind one call: ``defend(poisoned, spec) -> DefenseResult`` (defended dataset + record).

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
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..core.data import ImageDataset, seeded_subset
from ..core.device import DEVICES, resolve_device
from .relabelling import EXTRACTORS, PRETRAINED_EXTRACTOR

log = logging.getLogger(__name__)

DEFENSES = ("sanitise", "relabel", "denoise")


@dataclass(frozen=True)
class DefenseSpec:
    """One defence and its settings; only the fields of the chosen ``name`` are used.

    Defaults are the paper's where it gives them (fraction 0.5, sigma 0.1, ResNet-152); the
    training settings of the defender's own networks are not in the paper and are ours.
    """

    name: str
    seed: int = 0
    # sanitise: the defender's ResNet-18 and the share of each class to drop
    fraction: float = 0.5
    surrogate_epochs: int = 40
    surrogate_batch_size: int = 128
    surrogate_lr: float = 0.1
    surrogate_augment: bool = True
    # relabel: feature extractor and K-Means
    extractor: str = PRETRAINED_EXTRACTOR
    extractor_weights: str | None = None      # local ResNet-152 state dict; None: the torch hub cache
    extractor_image_size: int = 224           # images are resized to this for the ImageNet network
    allow_fallback: bool = False              # use the fallback extractor if the pretrained one is missing
    kmeans_restarts: int = 10
    # denoise: noise level and the DDPM
    sigma: float = 0.1                        # noise level on [0, 1] images
    ddpm_path: str | None = None              # local diffusers DDPM folder; None: train one on trusted images
    ddpm_trusted_size: int = 1000             # clean held-out images the small DDPM is trained on
    ddpm_epochs: int = 50
    ddpm_batch_size: int = 64
    ddpm_lr: float = 1e-3
    ddpm_width: int = 32
    ddpm_timesteps: int = 1000                # length of the DDPM's linear noise schedule
    ddpm_train_near_sigma: bool = True        # train on timesteps 0..2t only (t: the denoising step)
    denoise_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.name not in DEFENSES:
            raise ValueError(f"defense name must be one of {', '.join(DEFENSES)}, got {self.name!r}")
        _integer("seed", self.seed, minimum=0)
        if not (isinstance(self.fraction, (int, float)) and not isinstance(self.fraction, bool)) or not 0 < self.fraction < 1:
            raise ValueError(f"defense fraction must be in (0, 1) (share of each class to drop), got {self.fraction!r}")
        for key in ("surrogate_epochs", "surrogate_batch_size", "kmeans_restarts", "ddpm_trusted_size",
                    "ddpm_epochs", "ddpm_batch_size", "denoise_batch_size"):
            _integer(key, getattr(self, key), minimum=1)
        _integer("extractor_image_size", self.extractor_image_size, minimum=32)
        _integer("ddpm_timesteps", self.ddpm_timesteps, minimum=2)
        _integer("ddpm_width", self.ddpm_width, minimum=8)
        if self.ddpm_width % 8:
            raise ValueError(f"defense ddpm_width must be a multiple of 8, got {self.ddpm_width}")
        for key in ("surrogate_lr", "ddpm_lr", "sigma"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"defense {key} must be a positive number, got {value!r}")
        if self.sigma > 1:
            raise ValueError(f"defense sigma must be in (0, 1] (noise level on [0, 1] images), got {self.sigma!r}")
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"defense extractor must be one of {', '.join(EXTRACTORS)}, got {self.extractor!r}")
        for key in ("surrogate_augment", "allow_fallback", "ddpm_train_near_sigma"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"defense {key} must be true or false, got {getattr(self, key)!r}")
        for key in ("extractor_weights", "ddpm_path"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"defense {key} must be a non-empty path or null, got {value!r}")


def _integer(key: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"defense {key} must be an integer >= {minimum}, got {value!r}")


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
    spec: DefenseSpec,
    clean_labels,
    clean_images,
    poison_indices,
    trusted: ImageDataset | None,
) -> tuple[np.ndarray | None, torch.Tensor | None, np.ndarray | None]:
    if not isinstance(poisoned, ImageDataset):
        raise ValueError(f"poisoned must be an ImageDataset, got {type(poisoned).__name__}")
    if not isinstance(spec, DefenseSpec):
        raise ValueError(f"spec must be a DefenseSpec, got {type(spec).__name__}")
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
    if spec.name == "relabel" and n < poisoned.num_classes:
        raise ValueError(f"relabelling needs at least one sample per cluster ({poisoned.num_classes}), got {n} samples")
    if spec.name == "relabel" and poisoned.num_classes < 2:
        raise ValueError("relabelling needs at least two classes")
    if spec.name == "denoise":
        _check_denoise_inputs(poisoned, spec, trusted)
    if spec.name == "sanitise":
        from .sanitisation import drop_counts

        drop_counts(poisoned.labels.numpy(), poisoned.num_classes, spec.fraction)  # raises if a class would vanish
    return labels, images, indices


def _check_denoise_inputs(poisoned: ImageDataset, spec: DefenseSpec, trusted: ImageDataset | None) -> None:
    if spec.ddpm_path is not None:
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
    if len(trusted) < spec.ddpm_trusted_size:
        raise ValueError(
            f"ddpm_trusted_size is {spec.ddpm_trusted_size}, but trusted holds only {len(trusted)} images; "
            f"lower ddpm_trusted_size or hold out more clean images"
        )
    c, h, w = poisoned.shape_chw
    if h != w or h % 2:
        raise ValueError(f"the small DDPM needs square images of even size, got {h}x{w}")
    from .denoising import ddpm_scheduler, timestep_for_sigma

    timestep_for_sigma(ddpm_scheduler(spec.ddpm_timesteps).alphas_cumprod, spec.sigma)  # reachable noise level


# --------------------------------------------------------------------------- the defences


def _sanitise(poisoned, spec, device, clean_labels, clean_images, poison_indices, trusted) -> DefenseResult:
    from .sanitisation import filter_quality, sanitise

    out = sanitise(
        poisoned, spec.fraction, epochs=spec.surrogate_epochs, batch_size=spec.surrogate_batch_size,
        lr=spec.surrogate_lr, augment=spec.surrogate_augment, seed=spec.seed, device=device,
    )
    kept, dropped, losses = out["kept"], out["dropped"], out["losses"]
    record = {
        "fraction": spec.fraction,
        "surrogate": {"model": "resnet18_small", "epochs": spec.surrogate_epochs, "batch_size": spec.surrogate_batch_size,
                      "lr": spec.surrogate_lr, "augment": spec.surrogate_augment},
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


def _relabel(poisoned, spec, device, clean_labels, clean_images, poison_indices, trusted) -> DefenseResult:
    from .relabelling import agreement, best_matching, relabel

    out = relabel(
        poisoned, extractor=spec.extractor, allow_fallback=spec.allow_fallback, weights_path=spec.extractor_weights,
        image_size=spec.extractor_image_size, seed=spec.seed, device=device, n_init=spec.kmeans_restarts,
    )
    new_labels = out["labels"]
    k = poisoned.num_classes
    record = {
        "extractor": out["extractor"],
        "extractor_source": out["extractor_source"],
        "fallback_used": out["extractor"] != spec.extractor,
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


def _denoise(poisoned, spec, device, clean_labels, clean_images, poison_indices, trusted) -> DefenseResult:
    from .denoising import check_model_fits, ddpm_scheduler, load_pretrained_ddpm, noise_ratio, one_shot_denoise
    from .denoising import perturbation_removed, timestep_for_sigma, train_ddpm

    if spec.ddpm_path is not None:
        unet, scheduler = load_pretrained_ddpm(spec.ddpm_path)
        check_model_fits(unet, poisoned.shape_chw)
        timestep_for_sigma(scheduler.alphas_cumprod, spec.sigma)  # a sigma the schedule cannot reach: fail now
        ddpm = {"source": "pretrained", "path": spec.ddpm_path}
    else:
        held_out = seeded_subset(trusted, spec.ddpm_trusted_size, seed=spec.seed)
        step = timestep_for_sigma(ddpm_scheduler(spec.ddpm_timesteps).alphas_cumprod, spec.sigma)
        top = min(2 * step, spec.ddpm_timesteps - 1) if spec.ddpm_train_near_sigma else spec.ddpm_timesteps - 1
        unet, scheduler, history = train_ddpm(
            held_out.images, epochs=spec.ddpm_epochs, batch_size=spec.ddpm_batch_size, lr=spec.ddpm_lr,
            width=spec.ddpm_width, num_train_timesteps=spec.ddpm_timesteps, max_timestep=top, seed=spec.seed,
            device=device,
        )
        ddpm = {
            "source": "trained here on clean images held out by the defender (no pretrained DDPM given)",
            "trusted_dataset": trusted.name, "trusted_images": len(held_out), "epochs": spec.ddpm_epochs,
            "width": spec.ddpm_width, "timesteps": spec.ddpm_timesteps, "trained_timesteps": [0, top],
            "final_noise_mse": history[-1],
        }
    denoised, t = one_shot_denoise(
        poisoned.images, unet, scheduler, spec.sigma, seed=spec.seed, device=device, batch_size=spec.denoise_batch_size,
    )
    change = (denoised.double() - poisoned.images.double()) / 255.0
    record = {
        "sigma": spec.sigma,
        "ddpm": ddpm,
        "timestep": t,
        "noise_ratio_at_timestep": float(noise_ratio(scheduler.alphas_cumprod)[t]),
        "mean_squared_change": float(change.square().mean()),  # per pixel, images in [0, 1]
        "mean_squared_noise_added": spec.sigma ** 2,  # what a denoiser that removed nothing would leave
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
    spec: DefenseSpec,
    *,
    device: str | torch.device = "cpu",
    clean_labels=None,
    clean_images=None,
    poison_indices=None,
    trusted: ImageDataset | None = None,
) -> DefenseResult:
    """Apply the defence of ``spec`` to ``poisoned`` (never modified).

    ``trusted``: clean images the defender holds out (needed by ``denoise`` without a
    ``ddpm_path``). ``clean_labels``, ``clean_images`` (aligned with ``poisoned``) and
    ``poison_indices`` are the audit's knowledge, used only to score the defence in the record.
    ``trusted`` should not overlap ``poisoned``: the runner can pass clean training images
    outside the search subset. ``device``: ``auto``, ``cpu``, ``cuda`` or a torch device.
    """
    device = resolve_device(device) if isinstance(device, str) and device in DEVICES else torch.device(device)
    labels, images, indices = _check_inputs(poisoned, spec, clean_labels, clean_images, poison_indices, trusted)
    start = time.perf_counter()
    result = _DEFENCES[spec.name](poisoned, spec, device, labels, images, indices, trusted)
    result.record = {
        "defense": spec.name,
        "spec": asdict(spec),
        "dataset": poisoned.name,
        "samples_in": len(poisoned),
        "samples_out": len(result.dataset),
        **result.record,
        "seconds": time.perf_counter() - start,
    }
    log.info("defence %s: %d -> %d samples in %.1f s", spec.name, len(poisoned), len(result.dataset), result.record["seconds"])
    return result
