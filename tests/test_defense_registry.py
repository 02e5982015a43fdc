"""One record per defence (nbutils/defenses/registry.py): the lists derive from it, and what each
record says of its defence (what it changes, the settings it reads) is what the defence does."""
import dataclasses
import typing

import pytest
import torch

from nbutils.defenses import registry
from nbutils.defenses.defending import DefenseConfig, defend
from nbutils.pipeline import params

from test_defenses import blobs
from toys import Reads

#: each defence at its smallest real size (the fallback extractor, a DDPM of one epoch)
TINY = {
    "sanitise": {"surrogate_epochs": 1, "surrogate_batch_size": 15},
    "relabel": {"extractor": "random_resnet18", "kmeans_restarts": 1},
    "denoise": {"ddpm_trusted_size": 12, "ddpm_epochs": 1, "ddpm_batch_size": 8, "ddpm_width": 8, "ddpm_timesteps": 50},
}


def test_the_config_and_the_derived_lists_are_the_registry():
    assert typing.get_args(DefenseConfig.__pydantic_fields__["name"].annotation) == tuple(registry.DEFENSES)
    assert set(TINY) == set(registry.DEFENSES)
    assert registry.names(changes_labels=True) == ("relabel",)
    assert registry.names(drops_samples=False, changes_images=False) == ("relabel",)


def test_settings_partition_the_config_fields():
    fields = {f.name for f in dataclasses.fields(DefenseConfig)}
    owned = [s for d in registry.DEFENSES.values() for s in d.settings]
    assert len(owned) == len(set(owned)), "a setting owned by two defences"
    assert set(owned) == fields - {"name", "seed"}


def test_grid_yaml_and_defend_yaml_take_the_registry_defences():
    """grid.yaml's defence names and defend.yaml's sections are the registry's."""
    assert typing.get_args(params.DefenseEntry.model_fields["name"].annotation) == tuple(registry.DEFENSES)
    assert set(registry.DEFENSES) <= set(params.DefendParams.model_fields)


@pytest.mark.parametrize("name", list(registry.DEFENSES))
def test_each_defence_changes_what_its_record_says_and_reads_its_own_settings_only(name):
    defense = registry.DEFENSES[name]
    clean = blobs(per_class=8)
    flipped = clean.labels.clone()
    flipped[::4] = (flipped[::4] + 1) % clean.num_classes   # some wrong labels, for the relabelling to undo
    poisoned = type(clean)(clean.name, clean.images, flipped, clean.classes)
    config = DefenseConfig(name, seed=0, **TINY[name])
    trusted = blobs(per_class=8, seed=1)
    out = defend(poisoned, config, device="cpu", trusted=trusted).dataset

    assert (len(out) < len(poisoned)) == defense.drops_samples
    if not defense.drops_samples:
        assert bool((out.labels != poisoned.labels).any()) == defense.changes_labels
        assert (not torch.equal(out.images, poisoned.images)) == defense.changes_images

    reads = Reads(config)
    defense.check(poisoned, reads, trusted)
    defense.apply(poisoned, reads, torch.device("cpu"), None, None, None, trusted)
    assert reads.read - {"name", "seed"} <= set(defense.settings)
