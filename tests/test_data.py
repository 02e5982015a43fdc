"""Tests for nbutils.core.datasets, image_dataset and batches: loaders on real-format fixtures, splits, the poisoned view, batches."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from nbutils.core import datasets, image_dataset
from nbutils.core.batches import BatchLoader
from nbutils.core.datasets import DATA_ROOT_ENV, DATASETS, DatasetNotFound, load_dataset, resolve_data_root
from nbutils.core.image_dataset import ImageDataset, channel_stats, search_split, seeded_subset

import dataset_fixtures as fx


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No cached datasets, no data root from the environment, no real Debian files unless a test asks."""
    datasets._load_cached.cache_clear()
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    yield
    datasets._load_cached.cache_clear()


def make_ds(n: int = 40, num_classes: int = 4, chw: tuple[int, int, int] = (3, 8, 8), seed: int = 0) -> ImageDataset:
    """A synthetic dataset whose pixel [0, 0, 0] is the sample's index, so samples can be traced."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, size=(n, *chw), dtype=np.uint8))
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    labels = torch.arange(n, dtype=torch.int64) % num_classes
    return ImageDataset("synthetic", images, labels, tuple(f"c{i}" for i in range(num_classes)))


def assert_matches(ds: ImageDataset, expected: fx.Expected, split: str, name: str) -> None:
    assert ds.name == name
    assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
    assert ds.labels.dtype == torch.int64
    np.testing.assert_array_equal(ds.images.numpy(), expected.images[split])
    np.testing.assert_array_equal(ds.labels.numpy(), expected.labels[split])
    assert list(ds.classes) == expected.classes


# --------------------------------------------------------------------------- loaders


WRITERS = {
    "cifar10": fx.write_cifar10,
    "cifar100": fx.write_cifar100,
    "mnist": fx.write_mnist,
    "fashion_mnist": fx.write_fashion_mnist,
    "svhn": fx.write_svhn,
}


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", list(WRITERS))
def test_torchvision_loaders_return_fixture_pixels_exactly(name, split, tmp_path, monkeypatch):
    expected = WRITERS[name](tmp_path)
    fx.trust_fixture_checksums(monkeypatch, tmp_path)
    ds = load_dataset(name, split, data_root=str(tmp_path))
    assert_matches(ds, expected, split, name)
    assert ds.num_classes == (100 if name == "cifar100" else 10)
    assert ds.in_channels == (1 if "mnist" in name else 3)
    assert ds.image_size == (28 if "mnist" in name else 32)
    assert len(ds) == len(expected.labels[split])


def test_svhn_label_10_becomes_0(tmp_path, monkeypatch):
    import scipy.io

    expected = fx.write_svhn(tmp_path)
    stored = scipy.io.loadmat(str(tmp_path / "train_32x32.mat"))["y"].ravel()
    assert 10 in stored and 0 not in stored
    fx.trust_fixture_checksums(monkeypatch, tmp_path)
    ds = load_dataset("svhn", "train", data_root=tmp_path)
    assert 0 in ds.labels.tolist()
    np.testing.assert_array_equal(ds.labels.numpy(), np.where(stored == 10, 0, stored))
    np.testing.assert_array_equal(ds.labels.numpy(), expected.labels["train"])


def test_cifar_integrity_check_still_runs(tmp_path, monkeypatch):
    fx.write_cifar10(tmp_path)
    fx.trust_fixture_checksums(monkeypatch, tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(DatasetNotFound, match="cifar10"):
        load_dataset("cifar10", data_root=tmp_path)


@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_mnist_falls_back_to_debian_files(split, tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    expected = fx.write_debian_fashion_mnist(debian)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", debian)
    ds = load_dataset("fashion_mnist", split, data_root=tmp_path / "empty-root")
    assert_matches(ds, expected, split, "fashion_mnist")


def test_fashion_mnist_class_names_are_torchvision_s():
    from torchvision.datasets import FashionMNIST

    assert datasets.FASHION_MNIST_CLASSES == tuple(FashionMNIST.classes)   # kept without importing torchvision


def test_fashion_mnist_prefers_torchvision_layout_over_debian(tmp_path, monkeypatch):
    in_root = fx.write_fashion_mnist(tmp_path / "root", seed=1)
    fx.write_debian_fashion_mnist(tmp_path / "debian", seed=2)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    ds = load_dataset("fashion_mnist", "train", data_root=tmp_path / "root")
    assert_matches(ds, in_root, "train", "fashion_mnist")


@pytest.mark.parametrize(
    "name, place",
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("mnist", "MNIST/raw"),
        ("fashion_mnist", "FashionMNIST/raw"),
        ("svhn", "test_32x32.mat"),
    ],
)
def test_missing_dataset_names_every_place_looked(name, place, tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(DatasetNotFound) as info:
        load_dataset(name, "test", data_root=root)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert repr(name) in message
    assert str(root / place) in message
    assert DATA_ROOT_ENV in message and "download=True" in message
    if name == "fashion_mnist":
        assert str(datasets.DEBIAN_FASHION_MNIST) in message
        assert "apt install dataset-fashion-mnist" in message


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"name": "imagenet"}, "name"),
        ({"name": "cifar10", "split": "val"}, "split"),
        ({"name": "digits", "image_size": 4}, "image_size"),
        ({"name": "digits", "image_size": 16.0}, "image_size"),
        ({"name": "digits", "image_size": True}, "image_size"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_parameter(kwargs, parameter, tmp_path):
    with pytest.raises(ValueError, match=parameter) as info:
        load_dataset(data_root=tmp_path / "never-touched", **kwargs)
    bad_value = next(iter(v for k, v in kwargs.items() if k == parameter))
    assert repr(bad_value) in str(info.value)
    assert not (tmp_path / "never-touched").exists()


def test_unknown_name_lists_allowed_values():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    assert all(name in str(info.value) for name in DATASETS)


def test_data_root_parameter_beats_env_beats_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_root(None) == tmp_path / "home" / ".cache" / "nbutils" / "data"
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "from-env"))
    assert resolve_data_root(None) == tmp_path / "from-env"
    assert resolve_data_root("") == tmp_path / "from-env"
    assert resolve_data_root(str(tmp_path / "from-param")) == tmp_path / "from-param"


def test_load_dataset_reads_the_env_data_root(tmp_path, monkeypatch):
    expected = fx.write_mnist(tmp_path / "env-root")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env-root"))
    assert_matches(load_dataset("mnist", "test"), expected, "test", "mnist")
    with pytest.raises(DatasetNotFound):  # the parameter wins over the env var
        load_dataset("mnist", "test", data_root=tmp_path / "elsewhere")


def test_loaded_datasets_are_cached_per_arguments(tmp_path):
    fx.write_mnist(tmp_path / "a", seed=0)
    fx.write_mnist(tmp_path / "b", seed=1)
    first = load_dataset("mnist", data_root=tmp_path / "a")
    assert load_dataset("mnist", data_root=tmp_path / "a") is first
    assert load_dataset("mnist", data_root=tmp_path / "b").checksum() != first.checksum()


def test_digits_loads_and_splits_deterministically():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.shape_chw == test.shape_chw == (1, 8, 8)
    assert train.num_classes == test.num_classes == 10
    assert (len(train), len(test)) == (1437, 360)
    assert int(train.images.max()) == 255 and train.images.dtype == torch.uint8
    assert set(test.labels.tolist()) == set(range(10))  # stratified: every class in the test split
    sums = train.checksum(), test.checksum()
    datasets._load_cached.cache_clear()
    assert (load_dataset("digits", "train").checksum(), load_dataset("digits", "test").checksum()) == sums


def test_digits_pixels_are_scaled_0_16_to_0_255():
    from sklearn.datasets import load_digits

    raw = load_digits().images
    values = set(np.unique(load_dataset("digits", "test").images.numpy()).tolist())
    assert values <= {round(v * 255 / 16) for v in range(17)}
    assert raw.max() == 16


def test_image_size_resizes_to_uint8_squares():
    native = load_dataset("digits", "test")
    big = load_dataset("digits", "test", image_size=16)
    assert big.images.shape == (len(native), 1, 16, 16)
    assert big.images.dtype == torch.uint8 and big.image_size == 16
    assert torch.equal(big.labels, native.labels)
    assert load_dataset("digits", "test", image_size=8) is native  # same size: nothing to do
    # A constant image stays exactly constant through the float round trip.
    flat = ImageDataset("flat", torch.full((2, 3, 10, 10), 77, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ("a",))
    assert torch.equal(image_dataset._resize_uint8(flat.images, 24), torch.full((2, 3, 24, 24), 77, dtype=torch.uint8))


def test_corrupt_idx_bad_magic_is_refused_clearly(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    fx.write_debian_fashion_mnist(debian)
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    fx.write_idx(debian / "t10k-images-idx3-ubyte.gz", images, magic=0x00000802)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", debian)
    with pytest.raises(ValueError, match=r"magic number must be 0x00000803, got 0x00000802"):
        load_dataset("fashion_mnist", "test", data_root=tmp_path / "empty")


def test_corrupt_idx_wrong_size_or_not_gzip_is_refused(tmp_path):
    truncated = tmp_path / "labels-idx1-ubyte.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(fx.idx_bytes(np.arange(10, dtype=np.uint8))[:-3])
    with pytest.raises(ValueError, match="corrupt"):
        datasets._read_idx(truncated, 0x00000801)
    not_gzip = tmp_path / "images-idx3-ubyte.gz"
    not_gzip.write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match="corrupt"):
        datasets._read_idx(not_gzip, 0x00000803)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist_test_split(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", Path("/usr/share/datasets/fashion-mnist"))
    ds = load_dataset("fashion_mnist", "test", data_root=tmp_path / "empty")
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 10 and ds.classes[0] == "T-shirt/top"
    assert torch.bincount(ds.labels).tolist() == [1000] * 10


# --------------------------------------------------------------------------- the dataset object


def test_image_dataset_validates_its_fields():
    with pytest.raises(ValueError, match="images must be a uint8"):
        ImageDataset("x", torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), ("a",))
    with pytest.raises(ValueError, match="labels must be an int64"):
        ImageDataset("x", torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32), ("a",))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        ImageDataset("x", torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), ("a", "b"))
    ds = ImageDataset("x", torch.zeros(2, 4, 4, 1, dtype=torch.uint8).permute(0, 3, 1, 2), torch.tensor([0, 1]), ["a", "b"])
    assert ds.images.is_contiguous() and ds.classes == ("a", "b") and ds.shape_chw == (1, 4, 4)


def test_subset_copies_and_never_aliases():
    ds = make_ds()
    before = ds.checksum()
    sub = ds.subset([3, 1, 4])
    assert sub.images[:, 0, 0, 0].tolist() == [3, 1, 4]
    sub.images.zero_()
    sub.labels.zero_()
    assert ds.checksum() == before
    with pytest.raises(IndexError, match="indices"):
        ds.subset([0, len(ds)])


def test_checksum_is_stable_and_sensitive():
    ds = make_ds()
    assert ds.checksum() == make_ds().checksum()
    assert len(ds.checksum()) == 64
    assert ImageDataset("other", ds.images, ds.labels, ds.classes).checksum() != ds.checksum()
    assert ds.with_replacements([0], labels=[(int(ds.labels[0]) + 1) % 4]).checksum() != ds.checksum()


def test_with_replacements_changes_exactly_the_given_indices():
    ds = make_ds()
    before = ds.checksum()
    original_images, original_labels = ds.images.clone(), ds.labels.clone()
    idx = [5, 0, 17]
    new_images = torch.full((3, 3, 8, 8), 200, dtype=torch.uint8)
    new_labels = torch.tensor([3, 3, 0])
    poisoned = ds.with_replacements(idx, images=new_images, labels=new_labels)

    assert ds.checksum() == before
    assert torch.equal(ds.images, original_images) and torch.equal(ds.labels, original_labels)
    assert torch.equal(poisoned.images[idx], new_images)
    assert torch.equal(poisoned.labels[idx], new_labels)
    others = torch.ones(len(ds), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(poisoned.images[others], ds.images[others])
    assert torch.equal(poisoned.labels[others], ds.labels[others])
    assert poisoned.name == ds.name and poisoned.classes == ds.classes
    poisoned.images.zero_()  # writing into the poisoned view leaves the original alone
    assert ds.checksum() == before


def test_with_replacements_labels_only_and_images_only():
    ds = make_ds()
    flipped = ds.with_replacements(np.array([2]), labels=np.array([0]))
    assert torch.equal(flipped.images, ds.images) and int(flipped.labels[2]) == 0
    patched = ds.with_replacements(torch.tensor([2]), images=torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    assert torch.equal(patched.labels, ds.labels) and int(patched.images[2].sum()) == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"indices": [1, 2], "images": torch.zeros(2, 3, 8, 7, dtype=torch.uint8)}, ValueError, "images must have shape"),
        ({"indices": [1, 2], "images": torch.zeros(3, 3, 8, 8, dtype=torch.uint8)}, ValueError, "images must have shape"),
        ({"indices": [1, 2], "images": torch.zeros(2, 3, 8, 8)}, ValueError, "images must be uint8"),
        ({"indices": [1, 1], "labels": [0, 1]}, ValueError, "indices must be unique"),
        ({"indices": [1, 2], "labels": [0, 4]}, ValueError, r"labels must lie in \[0, 4\)"),
        ({"indices": [1, 2], "labels": [0, -1]}, ValueError, r"labels must lie in \[0, 4\)"),
        ({"indices": [1, 2], "labels": [0]}, ValueError, "labels must have shape"),
        ({"indices": [1, 2], "labels": [0.0, 1.0]}, ValueError, "labels must be integers"),
        ({"indices": [1, 40], "labels": [0, 1]}, IndexError, r"indices must lie in \[0, 40\)"),
        ({"indices": [1, 2]}, ValueError, "images and/or labels"),
    ],
)
def test_with_replacements_rejects_bad_input(kwargs, error, match):
    ds = make_ds()
    before = ds.checksum()
    with pytest.raises(error, match=match):
        ds.with_replacements(**kwargs)
    assert ds.checksum() == before


def test_channel_stats_known_values():
    images = torch.zeros(4, 2, 2, 2, dtype=torch.uint8)
    images[:, 0] = 255  # channel 0: all ones -> mean 1, std 0
    images[:2, 1] = 255  # channel 1: half ones -> mean 0.5, std 0.5
    mean, std = channel_stats(ImageDataset("s", images, torch.zeros(4, dtype=torch.int64), ("a",)))
    assert mean == pytest.approx((1.0, 0.5)) and std == pytest.approx((0.0, 0.5), abs=1e-7)


# --------------------------------------------------------------------------- splits and subsets


def traced(ds: ImageDataset) -> list[int]:
    return ds.images[:, 0, 0, 0].tolist()


@pytest.mark.parametrize("n", [40, 41])
def test_search_split_halves_are_disjoint_and_cover_everything(n):
    ds = make_ds(n=n)
    weights, arch = search_split(ds, seed=3)
    assert (len(weights), len(arch)) == (n // 2, n - n // 2)
    assert set(traced(weights)).isdisjoint(traced(arch))
    assert sorted(traced(weights) + traced(arch)) == list(range(n))
    again = search_split(ds, seed=3)
    assert traced(again[0]) == traced(weights)
    assert traced(search_split(ds, seed=4)[0]) != traced(weights)
    # Labels travel with their images.
    assert all(int(y) == i % 4 for i, y in zip(traced(weights), weights.labels))


def test_seeded_subset_is_seeded_exact_and_stratified():
    ds = make_ds(n=200, num_classes=4)
    sub = seeded_subset(ds, 40, seed=0)
    assert len(sub) == 40
    assert traced(seeded_subset(ds, 40, seed=0)) == traced(sub)
    assert traced(seeded_subset(ds, 40, seed=1)) != traced(sub)
    assert torch.bincount(sub.labels, minlength=4).tolist() == [10, 10, 10, 10]
    assert len(set(traced(sub))) == 40


def test_seeded_subset_edge_cases():
    ds = make_ds(n=30, num_classes=10)
    assert seeded_subset(ds, None, seed=0) is ds
    assert seeded_subset(ds, 30, seed=0) is ds and seeded_subset(ds, 99, seed=0) is ds
    tiny = seeded_subset(ds, 3, seed=0)  # fewer than the classes: plain random fallback
    assert len(tiny) == 3 and len(set(traced(tiny))) == 3
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="size"):
            seeded_subset(ds, bad, seed=0)


# --------------------------------------------------------------------------- batches


def identity_loader(ds: ImageDataset, batch_size: int, **kwargs) -> BatchLoader:
    """A loader with mean 0 / std 1, so batches are pixels / 255 and samples stay traceable."""
    c = ds.in_channels
    return BatchLoader(ds, batch_size, mean=(0.0,) * c, std=(1.0,) * c, **kwargs)


def epoch_indices(loader: BatchLoader) -> list[int]:
    return [int(v) for x, _ in loader for v in torch.round(x[:, 0, 0, 0] * 255)]


def test_batch_loader_covers_every_sample_once_per_epoch():
    ds = make_ds(n=37)
    loader = identity_loader(ds, 8, shuffle=True, seed=0)
    assert len(loader) == 5
    first, second = epoch_indices(loader), epoch_indices(loader)
    assert sorted(first) == sorted(second) == list(range(37))
    assert first != second  # reshuffled each epoch
    assert epoch_indices(identity_loader(ds, 8, shuffle=False, seed=0)) == list(range(37))


def test_batch_loader_batches_and_labels_line_up():
    ds = make_ds(n=37)
    loader = identity_loader(ds, 8, shuffle=True, seed=5, drop_last=True)
    assert len(loader) == 4
    batches = list(loader)
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        index = torch.round(x[:, 0, 0, 0] * 255).long()
        assert torch.equal(y, index % 4)
        assert torch.equal(torch.round(x * 255).to(torch.uint8), ds.images[index])


def test_batch_loader_repeats_exactly_for_a_seed():
    ds = make_ds(n=30)

    def run(seed: int) -> list[torch.Tensor]:
        loader = BatchLoader(ds, 7, shuffle=True, seed=seed, augment=True)
        return [x for _ in range(2) for x, _ in loader]

    a, b, c = run(11), run(11), run(12)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_batch_loader_normalises_to_zero_mean_unit_std():
    ds = make_ds(n=64, seed=3)
    loader = BatchLoader(ds, 10, shuffle=True, seed=0)
    assert loader.mean == pytest.approx(channel_stats(ds)[0])
    x = torch.cat([x for x, _ in loader])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (x.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4


def test_batch_loader_rejects_bad_arguments():
    ds = make_ds()
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, 0, shuffle=False, seed=0)
    with pytest.raises(ValueError, match="mean"):
        BatchLoader(ds, 4, shuffle=False, seed=0, mean=(0.5,), std=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="std"):
        BatchLoader(ds, 4, shuffle=False, seed=0, mean=(0.5,) * 3, std=(1.0, 0.0, 1.0))


def test_augment_without_padding_gives_original_or_its_mirror():
    ds = make_ds(n=64)
    loader = identity_loader(ds, 64, shuffle=False, seed=0, augment=True, crop_padding=0)
    (x, _), = list(loader)
    assert x.shape == (64, 3, 8, 8)
    original = ds.images.float() / 255
    same = (x == original).flatten(1).all(1)
    mirrored = (x == original.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert bool(same.any()) and bool(mirrored.any())


def test_augment_crop_is_a_zero_padded_shift():
    ds = make_ds(n=48, chw=(3, 6, 6))
    loader = identity_loader(ds, 48, shuffle=False, seed=1, augment=True, crop_padding=2)
    loader.flip = False  # test seam: the crop alone
    (x, _), = list(loader)
    assert x.shape == (48, 3, 6, 6)
    padded = torch.nn.functional.pad(ds.images.float() / 255, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(ds)):
        found = [(t, l) for t in range(5) for l in range(5) if torch.equal(x[i], padded[i, :, t : t + 6, l : l + 6])]
        assert found, f"augmented image {i} is no window of its zero-padded original"
        offsets.update(found)
    assert len(offsets) > 5  # the offsets really vary


def test_augment_pads_with_black_before_normalisation():
    images = torch.full((16, 1, 8, 8), 255, dtype=torch.uint8)
    images[8:] = 0
    ds = ImageDataset("bw", images, torch.zeros(16, dtype=torch.int64), ("a",))
    loader = BatchLoader(ds, 16, shuffle=False, seed=0, augment=True, crop_padding=4, mean=(0.5,), std=(0.25,))
    (x, _), = list(loader)
    pixels = x * 0.25 + 0.5
    assert torch.allclose(pixels[pixels < 0.5], torch.zeros(()), atol=1e-6)  # padding is pixel value 0
    assert bool((pixels[:8] < 0.5).any())  # some white image was shifted into the black border
