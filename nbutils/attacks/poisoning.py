"""Poisoning attacks behind one call: ``poison(dataset, config, models=...) -> PoisonSet``.

Budgets are fractions of the training set: exactly ``round(budget * n)`` samples, drawn
at random with the config's seed, are poisoned (CLF instead picks the surrogate's most
confident samples). Perturbation bounds are in 0..255 pixel units; images stay in [0, 1]
and are published as uint8, so quantisation is part of every clean-label attack.

    rlf       random label flipping: each poisoned label to a uniformly random *other* class
    clf       confidence-based label flipping (TMLR Algorithm 1), needs ``models["surrogate"]``
    gaussian  clean-label Gaussian noise, sigma and l_inf bound in pixel units
    gc        gradient canceling (TMLR Algorithm 2), needs ``models["target"]``: a trained final
              network (its weights are the target) or a converged supernet (its alphas are)
    alpha     the workshop paper's alpha-gradient attack (Algorithm 1), needs
              ``models["supernets"]``: the ensemble of supernets

The crafting itself lives in :mod:`.confidence_flip`, :mod:`.gradient_canceling` and
:mod:`.alpha_attack`; this module chooses the victims, calls the recipe and writes the header.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..core.config import NonNegativeNumber, PositiveInt, PositiveNumber, Seed, config, number
from ..core.data import ImageDataset, channel_stats
from ..core.poison_set import PoisonSet, poison_count, publish
from ..space.supernet import SuperNet
from ..training.surrogate import surrogate_logits
from .alpha_attack import craft_alpha_attack
from .confidence_flip import clf_poison_set
from .gradient_canceling import craft_gradient_canceling

log = logging.getLogger(__name__)

ATTACKS = ("rlf", "clf", "gaussian", "gc", "alpha")
LABEL_ATTACKS = ("rlf", "clf")          # change labels, never pixels
MODEL_NEEDED = {"clf": "surrogate", "gc": "target", "alpha": "supernets"}
ALPHA_CELLS = ("normal", "both")


@config
class AttackConfig:
    """One attack at one budget and its settings: what :func:`poison` runs with. Only the
    fields of the chosen ``name`` are used: ``name``, ``budget``, ``seed``, ``eps`` and ``sigma``
    by every attack (the bounds in 0..255 pixel units), and :data:`CRAFTING_FIELDS` by the
    crafted attacks."""

    name: Literal[ATTACKS]  # type: ignore[valid-type]
    budget: number(gt=0, le=1)   # fraction of the training set poisoned
    seed: Seed = 0
    eps: number(ge=0, le=255) = 16.0   # l_inf bound, pixel units (clean-label attacks)
    sigma: NonNegativeNumber = 16.0    # Gaussian noise standard deviation, pixel units
    # crafted attacks (gc, alpha): the optimisation of the perturbations
    steps: PositiveInt = 250
    lr: Optional[PositiveNumber] = None   # None: each recipe's default
    batch_size: PositiveInt = 128
    # gc: GradPC's corruption of the target (an L2 ball of this radius in parameter space);
    # the audit's poison files name eps=0.5 (weights) and eps=1.0 (P-DARTS alphas): see
    # the gradient_canceling module docstring for the evidence
    gradpc_epsilon: NonNegativeNumber = 1.0
    gradpc_steps: Optional[PositiveInt] = None   # None: one pass over the data
    gradpc_step_size: PositiveNumber = 1.0
    # alpha: which cells Eq. 2 sums over, and the differentiable augmentation (translation, flip)
    cells: Literal[ALPHA_CELLS] = "normal"  # type: ignore[valid-type]
    augment: bool = True


#: the fields of :class:`AttackConfig` that each crafted attack reads beyond the common ones
CRAFTING_FIELDS: dict[str, tuple[str, ...]] = {
    "gc": ("steps", "lr", "batch_size", "gradpc_epsilon", "gradpc_steps", "gradpc_step_size"),
    "alpha": ("steps", "lr", "batch_size", "cells", "augment"),
}


def choose_victims(n: int, budget: float, seed: int) -> torch.Tensor:
    """The sorted indices of a fixed-size random subset."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.sort(rng.choice(n, size=poison_count(n, budget), replace=False))).long()


def random_label_flip(dataset: ImageDataset, config: AttackConfig) -> PoisonSet:
    victims = choose_victims(len(dataset), config.budget, config.seed)
    rng = np.random.default_rng([config.seed, 1])
    old = dataset.labels[victims].numpy()
    # uniform over the other k-1 classes: shift by 1..k-1 modulo k
    shift = rng.integers(1, dataset.num_classes, size=len(victims))
    new = (old + shift) % dataset.num_classes
    return PoisonSet(indices=victims, labels=torch.from_numpy(new).long())


def gaussian_noise(dataset: ImageDataset, config: AttackConfig) -> PoisonSet:
    victims = choose_victims(len(dataset), config.budget, config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    clean = dataset.images[victims].float()
    noise = torch.randn(clean.shape, generator=generator) * config.sigma
    noise = noise.clamp(-config.eps, config.eps)
    poisoned = publish(clean + noise, clean, config.eps)
    return PoisonSet(indices=victims, labels=dataset.labels[victims].clone(), images=poisoned)


def _clf_with_surrogate(dataset: ImageDataset, config: AttackConfig, models: dict, device, normalisation) -> PoisonSet:
    """CLF: the flips chosen from the surrogate's logits on the clean search data."""
    mean, std = normalisation
    logits = surrogate_logits(models["surrogate"], dataset, mean, std, device)
    return clf_poison_set(dataset, logits, config.budget)


def _gc_against_target(dataset: ImageDataset, config: AttackConfig, models: dict, device, normalisation) -> PoisonSet:
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


def _alpha_attack_on_supernets(dataset: ImageDataset, config: AttackConfig, models: dict, device,
                               normalisation) -> PoisonSet:
    """The workshop paper's attack on an ensemble of clean DARTS supernets."""
    mean, std = normalisation
    return craft_alpha_attack(
        dataset, choose_victims(len(dataset), config.budget, config.seed), models["supernets"], eps=config.eps,
        steps=config.steps, lr=config.lr, batch_size=config.batch_size, mean=mean, std=std, device=device,
        seed=config.seed, augment=config.augment, cells=config.cells,
    )


_DATA_ONLY = {"rlf": random_label_flip, "gaussian": gaussian_noise}
_WITH_MODELS = {"clf": _clf_with_surrogate, "gc": _gc_against_target, "alpha": _alpha_attack_on_supernets}


def check_models(config: AttackConfig, models: dict | None) -> None:
    """Refuse, before any compute, an attack whose attacker model was not given."""
    need = MODEL_NEEDED.get(config.name)
    if need is None:
        return
    given = (models or {}).get(need)
    if given is None or (need == "supernets" and len(given) == 0):
        what = {"surrogate": "a trained surrogate classifier (the CLF ranking model)",
                "target": "a trained final network or a converged supernet (the GC target)",
                "supernets": "one or more trained supernets (the attack's ensemble)"}[need]
        raise ValueError(f"attack {config.name!r} needs models[{need!r}]: {what}; none was given")
    if need == "target" and not isinstance(given, nn.Module):
        raise ValueError(f"models['target'] must be a torch module, got {type(given).__name__}")


def poison(
    dataset: ImageDataset,
    config: AttackConfig,
    *,
    models: dict | None = None,
    device: str | torch.device = "cpu",
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> PoisonSet:
    """Craft the poison set of ``config`` against ``dataset`` (never modified).

    ``models``: what the crafted attacks need (see the module docstring); ``normalisation``:
    the (mean, std) the attacker's models were trained with, by default ``dataset``'s own.
    The header records the config, the source dataset's checksum and the crafting seconds; the
    crafted attacks add their objective's history (``header["crafting"]``), so an attack that
    could not reach its objective still leaves a valid poison set with its final loss.
    """
    check_models(config, models)
    start = time.perf_counter()
    if config.name in _DATA_ONLY:
        poison_set = _DATA_ONLY[config.name](dataset, config)
    else:
        normalisation = normalisation or channel_stats(dataset)
        poison_set = _WITH_MODELS[config.name](dataset, config, models, torch.device(device), normalisation)
    header = {
        "attack": config.name,
        "budget": config.budget,
        "eps": None if config.name in LABEL_ATTACKS else config.eps,
        "seed": config.seed,
        "config": asdict(config),
        "dataset": dataset.name,
        "dataset_size": len(dataset),
        "source_checksum": dataset.checksum(),
        "crafting_seconds": time.perf_counter() - start,
    }
    poison_set.header = {**poison_set.header, **header}
    log.info("%s: poisoned %d of %d samples in %.1f s", config.name, len(poison_set), len(dataset), header["crafting_seconds"])
    return poison_set
