"""Cluster-based relabelling: throw the labels away and let K-Means over image features assign new ones.

The TMLR paper's own countermeasure against label flipping (Table 4): extract final-layer
features of every training image with an ImageNet-pretrained ResNet-152, cluster them with
K-Means (one cluster per class) and give every image its cluster's label. The new labels do not
depend on the old ones at all, so adversarial flips (RLF, CLF) are gone at any budget; what is
left is the clustering's own, structured, label noise.

Feature extractors:

* ``resnet152_imagenet`` (the paper's): torchvision's ResNet-152 with ImageNet weights, read
  from a local file (``weights_path``) or from the torch hub cache
  (``<torch.hub.get_dir()>/checkpoints/resnet152-*.pth``, where torchvision would have stored
  them); nothing is downloaded. A weights file named explicitly that is missing is an error,
  never a reason to fall back. Images are scaled to [0, 1], grey images repeated to three
  channels, resized (bilinear, antialiased) to ``image_size`` (224, ImageNet's) and normalised
  with ImageNet's mean and std; the features are the 2048 pooled activations before ``fc``.
* ``random_resnet18`` (the fallback, used only when allowed): the small-image ResNet-18 of
  :mod:`nbutils.training.surrogate` with its initial random weights from a fixed seed, untrained; the
  512 pooled activations before ``fc`` on the images normalised by their channel statistics.
  Why this one: like a pretrained network it never sees the (possibly poisoned) labels and
  needs no download, and it keeps the paper's pipeline (a convolutional network's final-layer
  features, then K-Means). The obvious alternative, the defender's ResNet-18 trained on the
  poisoned data, learns the flipped labels: on 800 Fashion-MNIST images at 16x16 with 50%
  random label flips its features gave an adjusted Rand index of 0.06-0.13 against the clean
  labels, the random network's 0.37 (raw pixels: 0.41). It is a weak extractor; the record says
  which one produced the labels, so a report can tell the two apart.

Features are scaled to unit length before K-Means (scikit-learn, ``n_init`` restarts, seeded).
Cluster ids are arbitrary; they are renumbered by the Hungarian matching that best agrees with
the labels the defender holds (the poisoned ones), which changes nothing for training but makes
class names readable. Given the clean labels, the record holds the adjusted Rand index (which
ignores the numbering) and the agreement under the best cluster-to-class matching.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lazy_loader
import numpy as np
import torch
import torch.nn.functional as F

from ..core import deferred_imports
from ..core.batches import BatchLoader
from ..core.image_dataset import ImageDataset, channel_stats
from ..core.progress import progress
from ..training.surrogate import resnet18_small
from .result import DefenseResult

#: imported on first use (lazy_loader): scikit-learn takes ~0.5 s to import, and the CLI imports this module
sklearn = lazy_loader.load("sklearn")
#: imported on first use (lazy_loader): SciPy's submodules take ~1 s to import, and the CLI imports this module
scipy = lazy_loader.load("scipy")

log = logging.getLogger(__name__)

PRETRAINED_EXTRACTOR = "resnet152_imagenet"
FALLBACK_EXTRACTOR = "random_resnet18"
EXTRACTORS = (PRETRAINED_EXTRACTOR, FALLBACK_EXTRACTOR)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExtractorUnavailable(RuntimeError):
    """The pretrained feature extractor's weights are in none of the places looked (``places``)."""

    def __init__(self, message: str, places: list[Path]) -> None:
        super().__init__(message)
        self.places = places


# --------------------------------------------------------------------------- extractors


def resnet152_weight_files(weights_path: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where ResNet-152 ImageNet weights are looked for: ``weights_path`` alone when given,
    else torchvision's file names for both ImageNet weight versions in the torch hub cache."""
    if weights_path is not None and str(weights_path) != "":
        return [Path(weights_path).expanduser()]
    weights = deferred_imports.torchvision().models.ResNet152_Weights
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return [cache / Path(w.url).name for w in (weights.IMAGENET1K_V2, weights.IMAGENET1K_V1)]


def load_resnet152_imagenet(weights_path: str | os.PathLike[str] | None = None) -> tuple[torch.nn.Module, Path]:
    """torchvision ResNet-152 with ImageNet weights from a local file, ``fc`` replaced by identity.

    Raises :class:`ExtractorUnavailable` when no weight file exists in the places looked, and
    ValueError when a file exists but is not a ResNet-152 state dict.
    """
    places = resnet152_weight_files(weights_path)
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        looked = "\n".join(f"  - {p}" for p in places)
        raise ExtractorUnavailable(
            f"ImageNet-pretrained ResNet-152 weights not found (they cannot be downloaded here). Looked in:\n{looked}\n"
            f"Put torchvision's resnet152 weights file there or give extractor_weights: <path>, "
            f"or set allow_fallback: true to use the {FALLBACK_EXTRACTOR!r} extractor instead.",
            places,
        )
    model = deferred_imports.torchvision().models.resnet152(weights=None)
    try:
        state = torch.load(found, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - any failure here means the file is not what we need
        raise ValueError(f"extractor_weights {str(found)!r} is not a torchvision ResNet-152 state dict: {err}") from err
    model.fc = torch.nn.Identity()
    log.info("loaded ImageNet ResNet-152 weights from %s", found)
    return model.eval(), found


def random_resnet18(in_channels: int, seed: int) -> torch.nn.Module:
    """The fallback extractor: an untrained small-image ResNet-18 with weights drawn from ``seed``,
    ``fc`` replaced by identity (512 features)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = resnet18_small(num_classes=1, in_channels=in_channels)
    finally:
        torch.random.set_rng_state(state)
    model.fc = torch.nn.Identity()
    return model.eval()


@torch.no_grad()
def imagenet_features(
    model: torch.nn.Module, images: torch.Tensor, image_size: int, device: str | torch.device, batch_size: int = 64
) -> np.ndarray:
    """Features of uint8 images (N x C x H x W, C in {1, 3}) through an ImageNet model."""
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"an ImageNet extractor needs 1- or 3-channel images, got {channels} channels")
    device = torch.device(device)
    model = model.to(device).eval()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    batches = range(0, len(images), batch_size)
    for first in progress(batches, desc="ImageNet features", total=len(batches)):
        x = images[first : first + batch_size].to(device).float().div_(255.0)
        x = x.expand(-1, 3, -1, -1) if channels == 1 else x
        if tuple(x.shape[2:]) != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        out.append(model((x - mean) / std).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def dataset_features(model: torch.nn.Module, dataset: ImageDataset, device: str | torch.device, batch_size: int = 256) -> np.ndarray:
    """Features of every image, normalised by the dataset's own channel statistics (small-image networks)."""
    mean, std = channel_stats(dataset)
    model = model.to(torch.device(device)).eval()
    loader = BatchLoader(dataset, batch_size, shuffle=False, seed=0, mean=mean, std=std, device=device)
    return torch.cat([model(x).float().cpu() for x, _ in loader]).numpy()


# --------------------------------------------------------------------------- clustering


def kmeans_labels(features: np.ndarray, num_clusters: int, seed: int, n_init: int = 10) -> np.ndarray:
    """K-Means cluster ids (0..num_clusters-1) of the unit-length features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < num_clusters:
        raise ValueError(
            f"features must be N x D with N >= {num_clusters} (one cluster per class), got shape {features.shape}"
        )
    if not np.isfinite(features).all():
        raise ValueError("features must be finite (the extractor produced NaN or inf)")
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return sklearn.cluster.KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed).fit_predict(unit).astype(np.int64)


def best_matching(cluster_ids: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The one-to-one map cluster -> class that maximises agreement with ``labels`` (Hungarian
    method on the contingency table); ``mapping[c]`` is the class of cluster ``c``."""
    table = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(table, (np.asarray(cluster_ids), np.asarray(labels)), 1)
    rows, cols = scipy.optimize.linear_sum_assignment(table, maximize=True)
    mapping = np.empty(num_classes, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def agreement(cluster_ids: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """How well clusters recover ``labels``: adjusted Rand index and the accuracy of the best
    one-to-one cluster-to-class matching."""
    mapping = best_matching(cluster_ids, labels, num_classes)
    return {
        "ari": float(sklearn.metrics.adjusted_rand_score(labels, cluster_ids)),
        "matched_agreement": float((mapping[cluster_ids] == labels).mean()),
    }


def relabel(
    dataset: ImageDataset,
    *,
    extractor: str,
    allow_fallback: bool,
    weights_path: str | os.PathLike[str] | None,
    image_size: int,
    seed: int,
    device: str | torch.device,
    n_init: int = 10,
) -> dict:
    """New labels for ``dataset`` from K-Means over an extractor's features (see the module notes).

    Returns ``{"labels", "cluster_ids", "features_dim", "extractor", "extractor_source",
    "fallback_reason"}``; ``labels`` are the cluster ids renumbered to best agree with the labels
    ``dataset`` carries.
    """
    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor must be one of {', '.join(EXTRACTORS)}, got {extractor!r}")
    start = time.perf_counter()
    fallback_reason = None
    used, source = extractor, None
    if extractor == PRETRAINED_EXTRACTOR:
        try:
            model, path = load_resnet152_imagenet(weights_path)
            source = str(path)
        except ExtractorUnavailable as err:
            explicit = weights_path is not None and str(weights_path) != ""
            if not allow_fallback or explicit:
                raise
            fallback_reason = "ImageNet ResNet-152 weights not found in " + ", ".join(str(p) for p in err.places)
            log.warning("%s; falling back to the %s extractor (allow_fallback is set)", fallback_reason, FALLBACK_EXTRACTOR)
            used = FALLBACK_EXTRACTOR
    if used == PRETRAINED_EXTRACTOR:
        features = imagenet_features(model, dataset.images, image_size, device)
    else:
        source = f"untrained, weights drawn with seed {seed}"
        features = dataset_features(random_resnet18(dataset.in_channels, seed), dataset, device)
    cluster_ids = kmeans_labels(features, dataset.num_classes, seed, n_init)
    mapping = best_matching(cluster_ids, dataset.labels.numpy(), dataset.num_classes)
    log.info("relabelling with %s features (%d-d) took %.1f s", used, features.shape[1], time.perf_counter() - start)
    return {
        "labels": mapping[cluster_ids],
        "cluster_ids": cluster_ids,
        "features_dim": int(features.shape[1]),
        "extractor": used,
        "extractor_source": source,
        "fallback_reason": fallback_reason,
    }


# --------------------------------------------------------------------------- the defence


def check_relabel(poisoned: ImageDataset, config, trusted: ImageDataset | None) -> None:
    """Refuse, before any compute, a set K-Means cannot cluster into one cluster per class."""
    if len(poisoned) < poisoned.num_classes:
        raise ValueError(f"relabelling needs at least one sample per cluster ({poisoned.num_classes}), "
                         f"got {len(poisoned)} samples")
    if poisoned.num_classes < 2:
        raise ValueError("relabelling needs at least two classes")


def relabel_defense(poisoned: ImageDataset, config, device, clean_labels, clean_images, poison_indices,
                    trusted) -> DefenseResult:
    """The ``relabel`` defence of :func:`nbutils.defenses.defending.defend`: :func:`relabel` with
    ``config``'s settings; the record scores the new labels against the clean ones."""
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
