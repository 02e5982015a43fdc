"""The search augmentation per dataset, as the audit's forks search (TMLR Table 3's
out-of-distribution searches): crop and flip for CIFAR and Fashion-MNIST, nothing for MNIST
and SVHN."""
from __future__ import annotations

import pytest

from nbutils.core.datasets import DATASETS, SEARCH_AUGMENTATION, search_augmentation


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
