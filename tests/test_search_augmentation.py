"""The search augmentation per dataset, as the audit's forks search (TMLR Table 3's
out-of-distribution searches): crop and flip for CIFAR and Fashion-MNIST, nothing for MNIST
and SVHN."""
from __future__ import annotations

import pytest
import torch

from nbutils.core.data import DATASETS, SEARCH_AUGMENTATION, BatchLoader, search_augmentation
from nbutils.nas.darts import DartsConfig
from nbutils.nas.pdarts import PdartsConfig
from nbutils.nas.tenas import TenasConfig
from toys import toy


def test_every_dataset_has_its_search_augmentation():
    assert set(SEARCH_AUGMENTATION) == set(DATASETS)
    assert all(isinstance(search_augmentation(d), bool) for d in DATASETS)


def test_the_references_choice():
    """``ztcoalson/pdarts`` ``pdarts_utils.py`` and ``ztcoalson/TENAS``
    ``get_dataset_with_transform.py``: RandomCrop(32, padding=4) and RandomHorizontalFlip for
    CIFAR-10/100 and Fashion-MNIST; MNIST and SVHN only resized/normalised."""
    assert [search_augmentation(d) for d in ("cifar10", "cifar100", "fashion_mnist")] == [True, True, True]
    assert [search_augmentation(d) for d in ("mnist", "svhn")] == [False, False]
    assert search_augmentation("digits") and search_augmentation("noise")   # ours: today's default


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; known: cifar10, cifar100"):
        search_augmentation("imagenet")


def test_searches_take_the_tables_value():
    """What the search spec's ``augment`` becomes: the configs keep it, and a loader built with
    False yields the images unchanged (only normalised)."""
    for dataset in DATASETS:
        wanted = search_augmentation(dataset)
        assert DartsConfig(augment=wanted).augment is wanted
        assert PdartsConfig(augment=wanted).augment is wanted
        assert TenasConfig(augment=wanted).augment is wanted
    data = toy(6, seed=0, size=8)
    (x, _), = BatchLoader(data, 6, shuffle=False, seed=0, augment=search_augmentation("mnist"), mean=(0.0,),
                          std=(1.0,))
    assert torch.equal(x, data.images.float() / 255)
