"""Poisoning attacks and poison sets on disk."""
import numpy as np
import pytest
import torch

from nbutils.attacks.poisoning import AttackConfig, poison
from nbutils.core.poison_set import poison_count
from nbutils.core.poison_set import PoisonSet, PoisonSetMismatch

from toys import toy


def ten_classes(n: int = 1000, seed: int = 0):
    """``n`` random images of ten classes, labels drawn at random."""
    return toy(n, seed=seed, num_classes=10, random_labels=True)


@pytest.mark.parametrize("budget,count", [(0.01, 10), (0.1, 100), (0.5, 500), (1.0, 1000), (0.0015, 2)])
@pytest.mark.parametrize("attack", ["rlf", "gaussian"])
def test_exact_poisoned_count(attack, budget, count):
    ds = ten_classes()
    poison_set = poison(ds, AttackConfig(attack, budget))
    assert len(poison_set) == count == poison_count(len(ds), budget)
    assert len(torch.unique(poison_set.indices)) == count


def test_rlf_flips_to_uniformly_random_other_classes():
    ds = ten_classes(20000)
    poison_set = poison(ds, AttackConfig("rlf", 0.5, seed=3))
    old, new = ds.labels[poison_set.indices], poison_set.labels
    assert (old != new).all()
    assert poison_set.images is None
    # each of the 9 other classes is about equally likely: 10000 flips / (10 * 9) ~ 111 per pair
    pairs = np.zeros((10, 10), dtype=int)
    np.add.at(pairs, (old.numpy(), new.numpy()), 1)
    off_diagonal = pairs[~np.eye(10, dtype=bool)]
    assert off_diagonal.min() > 60 and off_diagonal.max() < 170


def test_poisoning_is_seeded_and_never_mutates_the_clean_set():
    ds = ten_classes()
    before = ds.checksum()
    a = poison(ds, AttackConfig("gaussian", 0.1, seed=1))
    b = poison(ds, AttackConfig("gaussian", 0.1, seed=1))
    c = poison(ds, AttackConfig("gaussian", 0.1, seed=2))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert not torch.equal(a.indices, c.indices)
    poisoned = a.apply(ds)
    assert ds.checksum() == before and poisoned.checksum() != before


def test_gaussian_is_clean_label_and_within_eps_after_quantisation():
    ds = ten_classes()
    config = AttackConfig("gaussian", 0.2, eps=8, sigma=16)
    poison_set = poison(ds, config)
    clean = ds.images[poison_set.indices].int()
    delta = poison_set.images.int() - clean
    assert torch.equal(poison_set.labels, ds.labels[poison_set.indices])
    assert poison_set.images.dtype == torch.uint8
    assert delta.abs().max() <= 8
    assert (delta != 0).float().mean() > 0.5  # the noise is really there
    view = poison_set.apply(ds).images.float() / 255
    assert view.min() >= 0 and view.max() <= 1


@pytest.mark.parametrize(
    "kwargs,message",
    [({"name": "rlf", "budget": 0.0}, "budget"), ({"name": "rlf", "budget": 1.5}, "budget"),
     ({"name": "gaussian", "budget": 0.1, "eps": 300}, "eps"), ({"name": "flip", "budget": 0.1}, "name = 'flip': Input should be 'rlf'")],
)
def test_bad_attack_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttackConfig(**kwargs)


def test_poison_set_round_trip(tmp_path):
    ds = ten_classes()
    original = poison(ds, AttackConfig("gaussian", 0.05))
    original.save(tmp_path)
    loaded = PoisonSet.load(tmp_path, ds)
    assert torch.equal(loaded.indices, original.indices)
    assert torch.equal(loaded.images, original.images)
    assert torch.equal(loaded.labels, original.labels)
    assert loaded.header["attack"] == "gaussian" and loaded.header["source_checksum"] == ds.checksum()
    assert loaded.header["crafting_seconds"] >= 0


def test_tampered_poison_set_is_refused(tmp_path):
    ds = ten_classes()
    original = poison(ds, AttackConfig("rlf", 0.05))
    original.save(tmp_path)
    arrays = dict(np.load(tmp_path / "poison.npz"))
    arrays["labels"] = (arrays["labels"] + 1) % 10
    np.savez(tmp_path / "poison.npz", **arrays)
    with pytest.raises(PoisonSetMismatch, match="checksum"):
        PoisonSet.load(tmp_path, ds)


def test_poison_set_refuses_another_dataset(tmp_path):
    poison(ten_classes(seed=0), AttackConfig("rlf", 0.05)).save(tmp_path)
    with pytest.raises(PoisonSetMismatch, match="crafted on dataset"):
        PoisonSet.load(tmp_path, ten_classes(seed=1))


def _recompute_checksum(folder, **header_changes):
    """What a careful tamperer does: edit the arrays, then recompute the checksum in the header."""
    import json

    loaded = np.load(folder / "poison.npz")
    arrays = {name: loaded[name] for name in loaded.files}
    digest = PoisonSet(*(torch.from_numpy(arrays[k]) for k in ("indices", "labels")),
                       images=torch.from_numpy(arrays["images"]) if "images" in arrays else None).arrays_checksum()
    header = json.loads((folder / "poison.json").read_text())
    header.update(arrays_sha256=digest, **header_changes)
    (folder / "poison.json").write_text(json.dumps(header))


def _fully_poisoned(folder, ds):
    everything = poison(ds, AttackConfig("rlf", 1.0))
    np.savez(folder / "poison.npz", indices=everything.indices.numpy(), labels=everything.labels.numpy())
    return len(everything)


def test_a_set_swapped_for_a_more_poisoned_one_is_refused_by_its_budget(tmp_path):
    """The issue's probe: arrays of a 100 % poisoned set, checksum recomputed, header still
    saying budget 0.05 (and even its count made to agree)."""
    ds = ten_classes()
    poison(ds, AttackConfig("rlf", 0.05)).save(tmp_path)
    count = _fully_poisoned(tmp_path, ds)
    _recompute_checksum(tmp_path, count=count)
    with pytest.raises(PoisonSetMismatch, match="1000 poisoned samples, but budget 0.05 of 1000 images poisons 50"):
        PoisonSet.load(tmp_path, ds)


def test_a_set_swapped_with_a_consistent_header_is_refused_by_its_stage_record(tmp_path):
    """Arrays, checksum, count and budget all rewritten to agree: the record of the stage that
    crafted the set (its spec.json, with the SHA-256 of each file and the attack's config) says
    otherwise."""
    from nbutils.core.store import ArtifactStore

    ds = ten_classes()
    store = ArtifactStore(tmp_path)
    work = store.begin("poison", "k")
    poison(ds, AttackConfig("rlf", 0.05)).save(work)
    folder = store.commit(work, "poison", "k", {"spec": {"attack": {"name": "rlf", "budget": 0.05, "seed": 0}}})
    PoisonSet.load(folder, ds)   # sound
    count = _fully_poisoned(folder, ds)
    _recompute_checksum(folder, count=count, budget=1.0)
    with pytest.raises(PoisonSetMismatch, match="does not match the SHA-256 its stage recorded"):
        PoisonSet.load(folder, ds)


def test_a_set_without_its_source_checksum_is_refused(tmp_path):
    import json

    ds = ten_classes()
    poison(ds, AttackConfig("rlf", 0.05)).save(tmp_path)
    header = json.loads((tmp_path / "poison.json").read_text())
    del header["source_checksum"]
    (tmp_path / "poison.json").write_text(json.dumps(header))
    with pytest.raises(PoisonSetMismatch, match="no source_checksum"):
        PoisonSet.load(tmp_path, ten_classes(seed=1))
