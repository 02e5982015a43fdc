"""The named datasets and where they are read from: each split as an
:class:`~nbutils.core.image_dataset.ImageDataset` (cached in-process).

Where the data comes from:

* ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``svhn``: the torchvision
  dataset classes, laid out as torchvision expects them under the data root
  (``data_root`` argument > ``$NBUTILS_DATA_ROOT`` > ``~/.cache/nbutils/data``);
  ``download=True`` lets torchvision fetch them when online.
* ``fashion_mnist`` also falls back to the Debian package ``dataset-fashion-mnist``
  (gzipped IDX files in :data:`DEBIAN_FASHION_MNIST`).
* ``digits``: scikit-learn's bundled 8 x 8 digits, no I/O at all.
* ``noise``: uniformly random images and labels, drawn here (the out-of-distribution extreme).
"""
from __future__ import annotations

import functools
import gzip
import logging
import math
import os
from pathlib import Path
from typing import Callable
from urllib.error import URLError

import lazy_loader
import numpy as np
import torch

from . import deferred_imports
from .image_dataset import ImageDataset, resized

#: imported on first use (lazy_loader): scikit-learn takes ~0.5 s to import, and the CLI imports this module
sklearn = lazy_loader.load("sklearn")

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


class DatasetNotFound(FileNotFoundError):
    """A dataset's files are in none of the places looked, and it could not be downloaded."""


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
    tvd = deferred_imports.torchvision().datasets
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
    bunch = sklearn.datasets.load_digits()
    pixels = np.rint(bunch.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)  # N x 8 x 8
    targets = bunch.target.astype(np.int64)
    train_idx, test_idx = sklearn.model_selection.train_test_split(
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
