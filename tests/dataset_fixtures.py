"""Tiny datasets written in each dataset's real on-disk format, for loader tests without network.

Each ``write_*`` function writes a handful of random images with known labels under a
folder, exactly where and how torchvision (or the Debian package) keeps them, and returns
an :class:`Expected` holding the pixels (uint8 N x C x H x W) and labels (int64) the
loader must return, so tests can compare for exact equality.

Checksums. torchvision checks the files it reads against the MD5 sums of the *real*
datasets for CIFAR-10, CIFAR-100 (``train_list``, ``test_list``, ``meta``) and SVHN
(``split_list``); no small fixture can match those. Rather than bypassing the check, the
tests call :func:`trust_fixture_checksums`, which monkeypatches those class-level tables
with the MD5 sums of the fixture files themselves: torchvision's own integrity check still
runs unchanged and still rejects a missing or altered file. MNIST and Fashion-MNIST need
nothing of the sort: torchvision only checks that the uncompressed raw files exist.
"""
from __future__ import annotations

import gzip
import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Sizes are small on purpose; CIFAR-10's train split spreads over its five batch files.
N_TRAIN = 12
N_TEST = 6
CIFAR10_PER_BATCH = 2

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class Expected:
    """What the loader must return for each split: uint8 N x C x H x W images, int64 labels, class names."""

    images: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)


def _random_split(rng: np.random.Generator, n: int, chw: tuple[int, int, int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(n, *chw), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    labels[: min(n, num_classes)] = np.arange(min(n, num_classes))  # the first classes all appear
    return images, labels


def _pickle(path: Path, obj: object) -> None:
    # Protocol 2 with str keys, which is what the original Python 2 pickles become once
    # torchvision loads them with encoding="latin1" (it indexes entry["data"], not b"data").
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """N x 3 x 32 x 32 -> N x 3072 rows laid out R..R G..G B..B, each channel row-major (the CIFAR layout)."""
    return np.ascontiguousarray(images.reshape(len(images), 3 * 32 * 32))


# --------------------------------------------------------------------------- CIFAR


def write_cifar10(root: str | Path, seed: int = 0) -> Expected:
    """``root/cifar-10-batches-py/``: data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    expected = Expected(classes=classes)

    train_images, train_labels = _random_split(rng, 5 * CIFAR10_PER_BATCH, (3, 32, 32), 10)
    for b in range(5):
        part = slice(b * CIFAR10_PER_BATCH, (b + 1) * CIFAR10_PER_BATCH)
        _pickle(
            folder / f"data_batch_{b + 1}",
            {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": train_labels[part].tolist(),
                "data": _cifar_rows(train_images[part]),
                "filenames": [f"train_{i}.png" for i in range(part.start, part.stop)],
            },
        )
    test_images, test_labels = _random_split(rng, N_TEST, (3, 32, 32), 10)
    _pickle(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_labels.tolist(),
            "data": _cifar_rows(test_images),
            "filenames": [f"test_{i}.png" for i in range(N_TEST)],
        },
    )
    _pickle(folder / "batches.meta", {"num_cases_per_batch": CIFAR10_PER_BATCH, "label_names": classes, "num_vis": 3072})
    expected.images = {"train": train_images, "test": test_images}
    expected.labels = {"train": train_labels, "test": test_labels}
    return expected


def write_cifar100(root: str | Path, seed: int = 0) -> Expected:
    """``root/cifar-100-python/``: train, test, meta (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    classes = [f"fine_{i:02d}" for i in range(100)]
    expected = Expected(classes=classes)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = _random_split(rng, n, (3, 32, 32), 100)
        _pickle(
            folder / split,
            {
                "filenames": [f"{split}_{i}.png" for i in range(n)],
                "batch_label": f"{split} batch",
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": _cifar_rows(images),
            },
        )
        expected.images[split], expected.labels[split] = images, labels
    _pickle(folder / "meta", {"fine_label_names": classes, "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    return expected


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An unsigned-byte IDX file: big-endian magic 0x000008<ndim>, one big-endian uint32 per dim, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 + array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: str | Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in .gz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array, magic)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _write_idx_dataset(folder: Path, seed: int, gzipped: bool, classes: list[str]) -> Expected:
    rng = np.random.default_rng(seed)
    ext = ".gz" if gzipped else ""
    expected = Expected(classes=classes)
    for split, prefix, n in (("train", "train", N_TRAIN), ("test", "t10k", N_TEST)):
        images, labels = _random_split(rng, n, (1, 28, 28), 10)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images[:, 0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels.astype(np.uint8))
        expected.images[split], expected.labels[split] = images, labels
    return expected


def write_mnist(root: str | Path, seed: int = 0) -> Expected:
    """``root/MNIST/raw/``: the four uncompressed IDX files torchvision checks for."""
    classes = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"]
    return _write_idx_dataset(Path(root) / "MNIST" / "raw", seed, gzipped=False, classes=classes)


def write_fashion_mnist(root: str | Path, seed: int = 0) -> Expected:
    """``root/FashionMNIST/raw/``: the four uncompressed IDX files torchvision checks for."""
    return _write_idx_dataset(Path(root) / "FashionMNIST" / "raw", seed, gzipped=False, classes=FASHION_CLASSES)


def write_debian_fashion_mnist(directory: str | Path, seed: int = 0) -> Expected:
    """The Debian package's layout: ``directory/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``."""
    return _write_idx_dataset(Path(directory), seed, gzipped=True, classes=FASHION_CLASSES)


# --------------------------------------------------------------------------- SVHN


def write_svhn(root: str | Path, seed: int = 0) -> Expected:
    """``root/train_32x32.mat`` and ``root/test_32x32.mat``: X is 32 x 32 x 3 x N, y is N x 1 in 1..10 (10 = digit 0)."""
    import scipy.io

    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expected = Expected(classes=[str(i) for i in range(10)])
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = _random_split(rng, n, (3, 32, 32), 10)  # labels 0..9, digit 0 included
        stored_y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(n, 1)
        # X[h, w, c, n] = image n, channel c, row h, column w.
        x = np.ascontiguousarray(images.transpose(2, 3, 1, 0))
        scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": stored_y})
        expected.images[split], expected.labels[split] = images, labels
    return expected


# --------------------------------------------------------------------------- checksums


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def trust_fixture_checksums(monkeypatch, root: str | Path) -> None:
    """Point torchvision's MD5 tables for CIFAR-10/100 and SVHN at the fixture files under ``root``.

    Only files that exist are re-registered, so a missing file still fails torchvision's
    integrity check (and so still means "not found"). See the module docstring for why.
    """
    from torchvision.datasets import CIFAR10, CIFAR100, SVHN

    root = Path(root)

    def md5_or(path: Path, original: str) -> str:
        return _md5(path) if path.is_file() else original

    for cls in (CIFAR10, CIFAR100):
        folder = root / cls.base_folder
        for table in ("train_list", "test_list"):
            patched = [[name, md5_or(folder / name, md5)] for name, md5 in getattr(cls, table)]
            monkeypatch.setattr(cls, table, patched)
        meta = dict(cls.meta)
        meta["md5"] = md5_or(folder / meta["filename"], meta["md5"])
        monkeypatch.setattr(cls, "meta", meta)

    split_list = {split: [url, name, md5_or(root / name, md5)] for split, (url, name, md5) in SVHN.split_list.items()}
    monkeypatch.setattr(SVHN, "split_list", split_list)
