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

Each attack is one record of :mod:`.registry` (name, crafting function, fields, flags); the
crafting lives in :mod:`.data_only`, :mod:`.confidence_flip`, :mod:`.gradient_canceling` and
:mod:`.alpha_attack`. This module holds the config and :func:`poison`, which checks the
attacker models, calls the attack's recipe and writes the header.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from ..core.config import NonNegativeNumber, PositiveInt, PositiveNumber, Seed, config, number
from ..core.image_dataset import ImageDataset, channel_stats
from ..core.poison_set import PoisonSet
from .registry import ATTACKS, MODEL_NEEDED

log = logging.getLogger(__name__)

ALPHA_CELLS = ("normal", "both")


@config
class AttackConfig:
    """One attack at one budget and its settings: what :func:`poison` runs with. Only the
    fields of the chosen ``name`` are used: ``name``, ``budget``, ``seed``, ``eps`` and ``sigma``
    by every attack (the bounds in 0..255 pixel units), and :data:`CRAFTING_FIELDS` by the
    crafted attacks."""

    name: Literal[tuple(ATTACKS)]  # type: ignore[valid-type]
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
    attack = ATTACKS[config.name]
    if attack.data_only:
        poison_set = attack.craft(dataset, config)
    else:
        normalisation = normalisation or channel_stats(dataset)
        poison_set = attack.craft(dataset, config, models, torch.device(device), normalisation)
    header = {
        "attack": config.name,
        "budget": config.budget,
        "eps": None if attack.changes_labels else config.eps,
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
