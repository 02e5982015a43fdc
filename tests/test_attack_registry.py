"""One record per attack (nbutils/attacks/registry.py): the lists derive from it, and what each
record says of its attack (labels or pixels, the model it needs, the fields it reads) is what the
attack does."""
import dataclasses
import typing

import pytest
import torch
from torch import nn

from nbutils.attacks import registry
from nbutils.attacks.poisoning import AttackConfig, poison
from nbutils.attacks.registry import CRAFTING_FIELDS
from nbutils.pipeline import grid_params, params, stages
from nbutils.report import tables

from toys import Reads, toy, toy_supernet

COMMON_FIELDS = {"name", "budget", "seed", "eps", "sigma"}
TINY = {"steps": 1, "batch_size": 4}
TINY_ATTACKS = params.Path(__file__).resolve().parent / "presets" / "tiny_attacks"


def attacker_models() -> dict:
    """Every attacker model, tiny: a linear surrogate, a supernet as GC's target, an ensemble of one."""
    surrogate = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    return {"surrogate": surrogate, "target": toy_supernet(seed=1), "supernets": [toy_supernet(seed=2)]}


def test_the_config_and_the_derived_lists_are_the_registry():
    assert typing.get_args(AttackConfig.__pydantic_fields__["name"].annotation) == tuple(registry.ATTACKS)
    assert registry.LABEL_ATTACKS == ("rlf", "clf")
    assert CRAFTING_FIELDS is registry.CRAFTING_FIELDS and set(CRAFTING_FIELDS) == {"gc", "alpha"}
    assert registry.names(data_only=True) == ("rlf", "gaussian")
    assert registry.names(needs_surrogate=True) == ("clf",)
    assert registry.names(against_nas=True) == ("gc", "alpha")
    assert registry.names(per_algorithm=True) == ("gc",)


def test_fields_are_config_fields_and_each_crafted_attack_has_its_craft_poisons_section():
    fields = {f.name for f in dataclasses.fields(AttackConfig)}
    sections = params.CraftPoisonsParams.model_fields
    for attack in registry.ATTACKS.values():
        assert set(attack.fields) <= fields - COMMON_FIELDS, attack.name
        if attack.fields:
            assert set(attack.fields) <= set(sections[attack.name].annotation.model_fields), attack.name


def test_grid_yaml_and_the_report_name_the_registry_attacks():
    """grid.yaml accepts the registry's attacks, the report names them as their records do, and
    label flipping skips the label-free algorithms exactly for the attacks that change labels."""
    assert grid_params.ATTACK_NAMES == ("none", *registry.ATTACKS)
    for name, attack in registry.ATTACKS.items():
        if name == "alpha":   # a condition names its ensemble: alpha-e6
            assert tables.attack_name("alpha-e6") == f"{attack.display_name} (e=6)"
        else:
            assert tables.attack_name(name) == attack.display_name
    grid = params.GridParams.model_validate(
        {"data": {"dataset": "digits"}, "nas_algorithms": ["darts", "tenas"],
         "attacks": [{"name": "none"}, *({"name": n, "budgets": [0.1]} for n in registry.ATTACKS)]})
    for entry in grid.attacks[1:]:
        skips_label_free = "tenas" not in grid.attacked(entry)
        assert skips_label_free == registry.ATTACKS[entry.name].changes_labels, entry.name


def test_per_algorithm_attacks_get_one_poison_set_per_algorithm_and_crafted_on_reads_that_algorithm():
    preset = params.load_preset(TINY_ATTACKS)
    poisons = [s for s in stages.expand(preset) if s.kind == "poison"]
    for stage in poisons:
        attack = registry.ATTACKS[stage.spec["attack"]["name"]]
        assert ("target" in stage.meta) == attack.per_algorithm, stage.label
        if attack.crafted_on:
            assert {i.meta["algorithm"] for i in stage.inputs.values()} == {attack.crafted_on}, stage.label
        assert ("surrogate" in stage.inputs) == attack.needs_surrogate, stage.label


@pytest.mark.parametrize("name", list(registry.ATTACKS))
def test_each_attack_changes_what_its_record_says(name):
    attack = registry.ATTACKS[name]
    clean = toy(24, seed=0)
    config = AttackConfig(name, 0.25, seed=1, **{k: v for k, v in TINY.items() if k in attack.fields})
    poison_set = poison(clean, config, models=None if attack.data_only else attacker_models())
    poisoned = poison_set.apply(clean)
    labels_changed = bool((poisoned.labels != clean.labels).any())
    assert labels_changed == attack.changes_labels
    assert (poison_set.images is None) == attack.changes_labels
    assert (poison_set.header["eps"] is None) == attack.changes_labels


@pytest.mark.parametrize("name", [n for n, a in registry.ATTACKS.items() if not a.data_only])
def test_an_attack_without_its_model_is_refused_naming_it(name):
    model = registry.ATTACKS[name].model
    others = {k: v for k, v in attacker_models().items() if k != model}
    with pytest.raises(ValueError, match=f"needs models\\['{model}'\\]"):
        poison(toy(24, seed=0), AttackConfig(name, 0.25), models=others)


@pytest.mark.parametrize("name", list(registry.ATTACKS))
def test_each_attack_reads_the_common_fields_and_its_own_only(name, monkeypatch):
    """The recipe behind each record reads its declared fields (and no other attack's): checked on
    the adapters, with the crafting engines replaced by stand-ins."""
    attack = registry.ATTACKS[name]
    clean = toy(24, seed=0)
    stand_in = lambda dataset, victims, *args, **kwargs: None   # noqa: E731
    monkeypatch.setattr(registry, "craft_gradient_canceling", stand_in)
    monkeypatch.setattr(registry, "craft_alpha_attack", stand_in)
    config = Reads(AttackConfig(name, 0.25, **{k: v for k, v in TINY.items() if k in attack.fields}))
    if attack.data_only:
        attack.craft(clean, config)
    else:
        attack.craft(clean, config, attacker_models(), torch.device("cpu"), ([0.5], [0.25]))
    assert config.read - COMMON_FIELDS == set(attack.fields)
