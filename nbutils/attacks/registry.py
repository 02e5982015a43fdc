"""One record per poisoning attack: its name and the papers' name for it, how it is crafted, the
config fields it reads and the facts the rest of the package asks of it.

Everything that lists attacks derives from :data:`ATTACKS`: the names
:class:`~nbutils.attacks.poisoning.AttackConfig` accepts, the attacks that change labels
(:data:`LABEL_ATTACKS`), which attacker model each needs (:data:`MODEL_NEEDED`) and each crafted
attack's fields (:data:`CRAFTING_FIELDS`: craft_poisons.yaml's sections in
:mod:`nbutils.pipeline.stage_params`). :func:`names` answers the other questions by flag, e.g.
``names(changes_labels=True)`` or ``names(against_nas=True)``.

Adding an attack is a crafting function (its own module for anything beyond a few lines), one
:class:`Attack` here, and its fields in :class:`~nbutils.attacks.poisoning.AttackConfig` (the
README's "Adding an attack" shows it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..core.poison_set import PoisonSet, choose_victims
from ..space.supernet import SuperNet
from ..training.surrogate import surrogate_logits
from .alpha_attack import craft_alpha_attack
from .confidence_flip import clf_poison_set
from .data_only import gaussian_noise, random_label_flip
from .gradient_canceling import craft_gradient_canceling

#: how an attack crafts its poison set from the clean data and its
#: :class:`~nbutils.attacks.poisoning.AttackConfig`: ``craft(dataset, config)`` for a data-only
#: attack, ``craft(dataset, config, models, device, normalisation)`` for one with an attacker
#: model (``models[Attack.model]``; ``normalisation``: the (mean, std) that model was trained with)
Craft = Callable[..., PoisonSet]


@dataclass(frozen=True)
class Attack:
    """What the package needs to know of one poisoning attack."""

    name: str              #: as grid.yaml and :class:`~nbutils.attacks.poisoning.AttackConfig` name it
    display_name: str      #: as the papers name it (the report's tables)
    craft: Craft           #: how :func:`~nbutils.attacks.poisoning.poison` runs it (:data:`Craft`)
    #: the :class:`~nbutils.attacks.poisoning.AttackConfig` fields it reads beyond the common ones
    #: (``name``, ``budget``, ``seed``, ``eps``, ``sigma``): its craft_poisons.yaml section
    fields: tuple[str, ...] = ()
    changes_labels: bool = False    #: flips labels and never pixels (``eps`` does not apply; label-free NAS is immune)
    #: the attacker model it needs, its key in ``poison(models=...)``: ``surrogate`` (a trained
    #: classifier), ``target`` (a network or supernet to cancel gradients at), ``supernets`` (an
    #: ensemble); None: data-only
    model: str | None = None
    #: crafted against each attacked NAS algorithm in turn (its best clean run is the target), so
    #: each algorithm gets its own poison set
    per_algorithm: bool = False
    #: crafted on this NAS algorithm's clean supernets, whichever algorithm is then attacked
    crafted_on: str | None = None

    @property
    def data_only(self) -> bool:
        """Needs no model: the data and the seed make the poison set."""
        return self.model is None

    @property
    def needs_surrogate(self) -> bool:
        """Reads a surrogate classifier trained on the clean data (the surrogate stage)."""
        return self.model == "surrogate"

    @property
    def against_nas(self) -> bool:
        """Crafted against a NAS algorithm's clean run (NAS-specific gradient canceling, the alpha attack)."""
        return self.per_algorithm or self.crafted_on is not None


def _clf(dataset, config, models: dict, device, normalisation) -> PoisonSet:
    """CLF: the flips chosen from the surrogate's logits on the clean search data."""
    mean, std = normalisation
    logits = surrogate_logits(models["surrogate"], dataset, mean, std, device)
    return clf_poison_set(dataset, logits, config.budget)


def _gc(dataset, config, models: dict, device, normalisation) -> PoisonSet:
    """Gradient canceling against a converged supernet's alpha, else against a network's weights."""
    target = models["target"]
    kind = "alphas" if isinstance(target, SuperNet) else "weights"
    mean, std = normalisation
    return craft_gradient_canceling(
        dataset, choose_victims(len(dataset), config.budget, config.seed), target, target=kind, eps=config.eps,
        steps=config.steps, lr=config.lr, batch_size=config.batch_size, gradpc_epsilon=config.gradpc_epsilon,
        gradpc_steps=config.gradpc_steps, gradpc_step_size=config.gradpc_step_size, mean=mean, std=std,
        device=device, seed=config.seed,
    )


def _alpha(dataset, config, models: dict, device, normalisation) -> PoisonSet:
    """The workshop paper's attack on an ensemble of clean DARTS supernets."""
    mean, std = normalisation
    return craft_alpha_attack(
        dataset, choose_victims(len(dataset), config.budget, config.seed), models["supernets"], eps=config.eps,
        steps=config.steps, lr=config.lr, batch_size=config.batch_size, mean=mean, std=std, device=device,
        seed=config.seed, augment=config.augment, cells=config.cells,
    )


#: every attack, in the order grid.yaml documents them and the report shows them
ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("rlf", "RLF", random_label_flip, changes_labels=True),
    # confidence-based label flipping, TMLR Algorithm 1
    Attack("clf", "CLF", _clf, changes_labels=True, model="surrogate"),
    Attack("gaussian", "Noise", gaussian_noise),
    # gradient canceling, TMLR Algorithm 2: NAS-specific (at alpha) against supernet algorithms
    Attack("gc", "GC", _gc, model="target", per_algorithm=True,
           fields=("steps", "lr", "batch_size", "gradpc_epsilon", "gradpc_steps", "gradpc_step_size")),
    # the workshop paper's alpha-gradient attack (Algorithm 1) on an ensemble of DARTS supernets
    Attack("alpha", "α-gradient", _alpha, model="supernets", crafted_on="darts",
           fields=("steps", "lr", "batch_size", "cells", "augment")),
)}


def names(**flags: bool) -> tuple[str, ...]:
    """The attacks whose flags (``changes_labels``, ``data_only``, ``needs_surrogate``,
    ``per_algorithm``, ``against_nas``) have the given values, in :data:`ATTACKS` order."""
    return tuple(a.name for a in ATTACKS.values() if all(getattr(a, f) == v for f, v in flags.items()))


#: the attacks that change labels, never pixels
LABEL_ATTACKS = names(changes_labels=True)
#: the attacker model each attack that needs one reads: its key in ``poison(models=...)``
MODEL_NEEDED: dict[str, str] = {a.name: a.model for a in ATTACKS.values() if a.model is not None}
#: the fields of :class:`~nbutils.attacks.poisoning.AttackConfig` each crafted attack reads beyond the common ones
CRAFTING_FIELDS: dict[str, tuple[str, ...]] = {a.name: a.fields for a in ATTACKS.values() if a.fields}
