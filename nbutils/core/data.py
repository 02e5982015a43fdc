"""Datasets, splits, subsets, batches and the poisoned view.

Every dataset is held the same way, whatever it came from: an :class:`ImageDataset` with
uint8 images ``N x C x H x W`` and int64 labels ``N``. Batches are float in [0, 1],
normalised per channel, made by :class:`BatchLoader` on the requested device.

Where the data comes from:

* ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``svhn``: the torchvision
  dataset classes, laid out as torchvision expects them under the data root
  (``data_root`` argument > ``$NBUTILS_DATA_ROOT`` > ``~/.cache/nbutils/data``);
  ``download=True`` lets torchvision fetch them when online.
* ``fashion_mnist`` also falls back to the Debian package ``dataset-fashion-mnist``
  (gzipped IDX files in :data:`DEBIAN_FASHION_MNIST`).
* ``digits``: scikit-learn's bundled 8 x 8 digits, no I/O at all.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "digits", "noise")
NOISE_SIZES = {"train": 2000, "test": 500}   # the noise dataset: 28x28 grey images, 10 random classes
SPLITS: tuple[str, ...] = ("train", "test")
#: images per split, as the loaders below return them (digits: the stratified 80/20 split)
SPLIT_SIZES: dict[str, dict[str, int]] = {
    "cifar10": {"train": 50000, "test": 10000},
    "cifar100": {"train": 50000, "test": 10000},
    "mnist": {"train": 60000, "test": 10000},
    "fashion_mnist": {"train": 60000, "test": 10000},
    "svhn": {"train": 73257, "test": 26032},
    "digits": {"train": 1437, "test": 360},
    "noise": dict(NOISE_SIZES),
}
#: Whether a search on each dataset augments its batches (random crop with padding 4 and
#: horizontal flip, :class:`BatchLoader`'s ``augment``), as the audit's searches do. Their
#: transforms (``ztcoalson/pdarts`` ``pdarts_utils.py``, ``ztcoalson/TENAS``
#: ``lib/datasets/get_dataset_with_transform.py``, the same in both) crop and flip CIFAR-10,
#: CIFAR-100 and Fashion-MNIST, and neither crop nor flip MNIST and SVHN (resize, grey to
#: three channels for MNIST, normalise: nothing random). ``digits`` and ``noise`` are ours and
#: keep the default, augmented.
SEARCH_AUGMENTATION: dict[str, bool] = {
    "cifar10": True, "cifar100": True, "fashion_mnist": True, "mnist": False, "svhn": False,
    "digits": True, "noise": True,
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATA_ROOT_ENV = "NBUTILS_DATA_ROOT"

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte data, 1 dimension
_RESIZE_CHUNK = 1024  # images resized at once, to bound float memory
_STATS_CHUNK = 4096  # images summed at once in channel_stats


class DatasetNotFound(FileNotFoundError):
    """A dataset's files are in none of the places looked, and it could not be downloaded."""


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


# --------------------------------------------------------------------------- loading


def search_augmentation(dataset: str) -> bool:
    """Whether searching on ``dataset`` augments, as the reference does (:data:`SEARCH_AUGMENTATION`)."""
    if dataset not in SEARCH_AUGMENTATION:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(SEARCH_AUGMENTATION)}")
    return SEARCH_AUGMENTATION[dataset]


def resolve_data_root(data_root: str | os.PathLike[str] | None) -> Path:
    """Where datasets live: ``data_root`` if given, else ``$NBUTILS_DATA_ROOT``, else ``~/.cache/nbutils/data``.

    An empty string counts as not given (papermill parameters often default to "").
    """
    if data_root is not None and str(data_root) != "":
        return Path(data_root).expanduser()
    from_env = os.environ.get(DATA_ROOT_ENV, "")
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "nbutils" / "data"


def load_dataset(
    name: str,
    split: str = "train",
    data_root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> ImageDataset:
    """Load one split of a dataset as an :class:`ImageDataset` (cached in-process).

    ``image_size``, when given and different, resizes every image to a square of that side.
    Raises :class:`DatasetNotFound` when the files are missing and cannot be downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {', '.join(DATASETS)}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8
    ):
        raise ValueError(f"image_size must be None or an int >= 8, got {image_size!r}")
    root = resolve_data_root(data_root)
    # The Debian location is read now (not at import) and is part of the cache key.
    debian_dir = Path(DEBIAN_FASHION_MNIST) if name == "fashion_mnist" else None
    return _load_cached(name, split, root, bool(download), image_size, debian_dir)


@functools.lru_cache(maxsize=32)
def _load_cached(
    name: str, split: str, root: Path, download: bool, image_size: int | None, debian_dir: Path | None
) -> ImageDataset:
    """The cached body of :func:`load_dataset`; arguments already validated and resolved."""
    if image_size is not None:
        base = _load_cached(name, split, root, download, None, debian_dir)
        if base.shape_chw[1:] == (image_size, image_size):
            return base
        logger.info("resizing %s/%s from %s to %dx%d", name, split, base.shape_chw[1:], image_size, image_size)
        return resized(base, image_size)

    train = split == "train"
    if name == "digits":
        ds = _load_digits(train)
    elif name == "noise":
        ds = _noise(train)
    elif name == "fashion_mnist":
        ds = _load_fashion_mnist(train, root, download, debian_dir)
    else:
        ds = _load_torchvision(name, train, root, download)
    logger.info("loaded %s/%s: %d images %s, %d classes", name, split, len(ds), ds.shape_chw, ds.num_classes)
    return ds


def _tv_locations(name: str, train: bool, root: Path) -> list[Path]:
    """The folder or file torchvision reads for ``name``, for error messages."""
    split_file = "train_32x32.mat" if train else "test_32x32.mat"
    return {
        "cifar10": [root / "cifar-10-batches-py"],
        "cifar100": [root / "cifar-100-python"],
        "mnist": [root / "MNIST" / "raw"],
        "fashion_mnist": [root / "FashionMNIST" / "raw"],
        "svhn": [root / split_file],
    }[name]


def _not_found(name: str, split: str, places: list[Path], download: bool, cause: object = None) -> DatasetNotFound:
    looked = "\n".join(f"  - {p}" for p in places)
    how = [
        f"put the files under a data root and pass it as data_root=... or set ${DATA_ROOT_ENV}",
        "or pass download=True (download: true in the parameters) on a machine with network access",
    ]
    if name == "fashion_mnist":
        how.insert(0, f"install the Debian package (apt install dataset-fashion-mnist) which fills {DEBIAN_FASHION_MNIST}")
    tried = " (download=True was tried and failed)" if download else ""
    detail = f"\ntorchvision said: {cause}" if cause else ""
    message = (
        f"dataset {name!r} (split {split!r}) not found{tried}. Looked in:\n{looked}\nTo get it: "
        + "; ".join(how)
        + "."
        + detail
    )
    return DatasetNotFound(message)


def _torchvision_class(name: str) -> Callable[..., object]:
    import torchvision.datasets as tvd

    return {
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
        "mnist": tvd.MNIST,
        "fashion_mnist": tvd.FashionMNIST,
        "svhn": tvd.SVHN,
    }[name]


def _load_torchvision(name: str, train: bool, root: Path, download: bool) -> ImageDataset:
    """Build a torchvision dataset and convert it to uint8 NCHW; missing files -> DatasetNotFound."""
    cls = _torchvision_class(name)
    split = "train" if train else "test"
    try:
        if name == "svhn":
            tv = cls(str(root), split=split, download=download)
        else:
            tv = cls(str(root), train=train, download=download)
    except (RuntimeError, URLError) as err:
        raise _not_found(name, split, _tv_locations(name, train, root), download, err) from err

    data = tv.data  # type: ignore[attr-defined]
    if name in ("cifar10", "cifar100"):  # numpy N x H x W x C
        images = torch.from_numpy(np.ascontiguousarray(np.asarray(data, dtype=np.uint8).transpose(0, 3, 1, 2)))
        labels = torch.as_tensor(np.asarray(tv.targets), dtype=torch.int64)  # type: ignore[attr-defined]
    elif name == "svhn":  # numpy N x C x H x W already; labels 10 -> 0 done by torchvision
        images = torch.from_numpy(np.ascontiguousarray(np.asarray(data, dtype=np.uint8)))
        labels = torch.as_tensor(np.asarray(tv.labels), dtype=torch.int64)  # type: ignore[attr-defined]
    else:  # MNIST-like: uint8 tensor N x H x W
        images = torch.as_tensor(data, dtype=torch.uint8).unsqueeze(1).contiguous()
        labels = torch.as_tensor(tv.targets, dtype=torch.int64)  # type: ignore[attr-defined]
    classes = tuple(getattr(tv, "classes", None) or (str(i) for i in range(10)))
    return ImageDataset(name, images, labels, classes)


#: torchvision's ``FashionMNIST.classes``, without importing torchvision
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


def _load_fashion_mnist(train: bool, root: Path, download: bool, debian_dir: Path | None) -> ImageDataset:
    """torchvision layout under the data root, else the Debian IDX files, else download, else not found."""
    split = "train" if train else "test"
    torchvision_raw = _tv_locations("fashion_mnist", train, root)[0]
    if torchvision_raw.is_dir():   # importing torchvision costs seconds: only when its files are there
        try:
            return _load_torchvision("fashion_mnist", train, root, download=False)
        except DatasetNotFound:
            logger.debug("fashion_mnist not in the torchvision layout at %s", torchvision_raw)

    places = [torchvision_raw]
    if debian_dir is not None:
        places.append(debian_dir)
        prefix = "train" if train else "t10k"
        image_file = debian_dir / f"{prefix}-images-idx3-ubyte.gz"
        label_file = debian_dir / f"{prefix}-labels-idx1-ubyte.gz"
        if image_file.is_file() and label_file.is_file():
            images = _read_idx(image_file, _IDX_IMAGES_MAGIC)
            labels = _read_idx(label_file, _IDX_LABELS_MAGIC)
            if len(images) != len(labels):
                raise ValueError(f"{image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels")
            logger.info("fashion_mnist/%s from the Debian package in %s", split, debian_dir)
            return ImageDataset(
                "fashion_mnist",
                torch.from_numpy(images).unsqueeze(1).contiguous(),
                torch.from_numpy(labels.astype(np.int64)),
                FASHION_MNIST_CLASSES,
            )

    if download:
        try:
            return _load_torchvision("fashion_mnist", train, root, download=True)
        except DatasetNotFound as err:
            raise _not_found("fashion_mnist", split, places, download, err.__cause__) from err.__cause__
    raise _not_found("fashion_mnist", split, places, download)


def _read_idx(path: str | os.PathLike[str], expected_magic: int) -> np.ndarray:
    """Parse an IDX file (gzipped if its name ends in .gz) of unsigned bytes into a numpy array.

    The header is a big-endian magic number (0x00000803 for images, 0x00000801 for labels)
    followed by one big-endian uint32 per dimension. Raises ValueError on anything else.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"IDX file {path} is corrupt: cannot be read ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is corrupt: {len(raw)} bytes, too short for a header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"IDX file {path} is corrupt: magic number must be 0x{expected_magic:08x}, got 0x{magic:08x}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is corrupt: truncated header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_bytes = header + math.prod(dims)
    if len(raw) != expected_bytes:
        raise ValueError(
            f"IDX file {path} is corrupt: header says dims {dims} ({expected_bytes} bytes), file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _load_digits(train: bool) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits, 0..16 scaled to 0..255, stratified 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = np.rint(bunch.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)  # N x 8 x 8
    targets = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(targets)), test_size=0.2, stratify=targets, random_state=0
    )
    idx = np.sort(train_idx if train else test_idx)
    return ImageDataset(
        "digits",
        torch.from_numpy(np.ascontiguousarray(pixels[idx][:, None])),
        torch.from_numpy(targets[idx]),
        tuple(str(i) for i in range(10)),
    )


def _noise(train: bool) -> ImageDataset:
    """Pure noise: uniformly random 28x28 grey images with uniformly random labels of 10
    classes (fixed seeds), the TMLR paper's extreme out-of-distribution search data."""
    generator = torch.Generator().manual_seed(0 if train else 1)
    n = NOISE_SIZES["train" if train else "test"]
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return ImageDataset("noise", images, labels, tuple(f"noise {i}" for i in range(10)))


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
    from sklearn.model_selection import train_test_split

    everything = np.arange(n)
    try:
        chosen = train_test_split(
            everything, train_size=int(size), stratify=ds.labels.numpy(), random_state=seed
        )[0]
    except ValueError as err:
        logger.info("seeded_subset: stratified sampling impossible for size %d (%s); sampling at random", size, err)
        chosen = train_test_split(everything, train_size=int(size), random_state=seed)[0]
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


# --------------------------------------------------------------------------- batches


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
