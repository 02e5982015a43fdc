"""How the report names things: the papers' names of the attacks and NAS algorithms, and a
trial's condition as the tables, the figures and the listing of trials write it."""
from __future__ import annotations

from ..attacks import registry as attack_registry
from ..nas import registry

#: the papers' names of the attacks (:func:`attack_name`)
ATTACK_NAMES = {"none": "None", **{name: a.display_name for name, a in attack_registry.ATTACKS.items()}}
#: the label-flipping attacks: they change labels only, never images (a label-free search cannot see them)
LABEL_FLIPS = attack_registry.LABEL_ATTACKS
#: the papers' names of the NAS algorithms, from the registry, and of random sampling
ALGORITHM_NAMES = {**{name: a.display_name for name, a in registry.ALGORITHMS.items()}, "random": "Random"}


def attack_name(attack: str) -> str:
    """How the papers name a condition's attack (the alpha attack: the workshop paper's, with e)."""
    if attack.startswith("alpha-e"):
        return f"{ATTACK_NAMES['alpha']} (e={attack[len('alpha-e'):]})"
    return ATTACK_NAMES.get(attack, attack.upper())


def algorithm_name(algorithm: str) -> str:
    return ALGORITHM_NAMES.get(algorithm, algorithm)


def condition_label(attack: str, budget: float | None) -> str:
    return "None" if attack == "none" else f"{attack_name(attack)} {100 * budget:g}%"


def trial_condition(row) -> str:
    """A trial's condition as the figures and the listing name it, with its study."""
    condition = "random sampling" if row.algorithm == "random" else condition_label(row.attack, row.budget)
    if row.study == "ood":
        condition += f", searched on {row.search_dataset}"
    elif row.study == "no_augment":
        condition += ", search without augmentation"
    elif row.study.startswith("defense:"):
        condition += f", defended by {row.study.removeprefix('defense:')}"
    return condition
