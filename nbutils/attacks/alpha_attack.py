"""The workshop paper's clean-label attack on DARTS (Algorithm 1, Eq. 2).

Poisons are crafted so that the architecture gradient they produce favours the worst-case
architectures found by anti-search (few convolutions, many pools and skips):

    L_adv = sum_{(i,j)} sum_{o in O} (S_nc(o) - S_c(o)) * dL_xe / d alpha_o^{(i,j)}      (Eq. 2)

``S_c(o) = 1`` for the convolutions (``sep_conv_*``, ``dil_conv_*``), ``S_nc = 1 - S_c`` (``none``,
pools, ``skip_connect``). Minimising ``L_adv`` makes the alpha gradient negative on
non-convolutions and positive on convolutions, so a descent step on alpha moves weight from
convolutions to the other operations. ``L_adv`` is computed with ``create_graph=True`` and is
differentiated with respect to the input pixels.

Scope of the sum (``cells``). The paper states its worst case "in the normal cell" ("we limit
our attention to the normal cell, as we deem feature extraction the most important") and
Eq. 2 iterates over the (i, j) connections of "a DARTS cell": the default ``cells="normal"``
sums over the 14 edges of ``alpha_normal``; ``cells="both"`` adds the same sum over
``alpha_reduce``. (Per edge, the softmax makes the alpha gradient sum to zero, so Eq. 2 equals
``2 * sum of the non-convolution gradients``; either form gives the same optimisation.)
On supernets with per-edge operation subsets (P-DARTS stages) the selector follows each
edge's remaining operations.

Crafting (Algorithm 1): an ensemble of supernets (``e = 1``: the supernet after the full
search; ``e = 6``: snapshots after 0, 10, ..., 50 epochs, given by the caller); each step,
for every batch of poisons, the poisons are augmented (:mod:`.diff_augment`, one draw shared
by the ensemble), ``L_adv`` is averaged over the ensemble and backpropagated into the
perturbation; then one signed-Adam step (Adam fed ``sign(grad)``) on all perturbations,
followed by the projection onto the ``l_inf`` ball and [0, 1] (the loop is
:func:`.perturbation.optimise_perturbation`). The learning rate decays by 10x at 3/8, 5/8
and 7/8 of the steps, as in Witches' Brew (``lr_decay=False`` keeps it fixed).
Supernets are used in training mode (DARTS takes architecture gradients with BN on batch
statistics), with dropout off, on private copies.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.diff_augment import differentiable_augment
from ..core.image_dataset import channel_stats
from ..core.poison_set import PoisonSet, publish
from ..space.ops import CONVOLUTIONS
from .perturbation import batch_slices, crafting_copy, optimise_perturbation

log = logging.getLogger(__name__)

CELLS = ("normal", "both")


def _cell_names(cells: str) -> tuple[str, ...]:
    if cells not in CELLS:
        raise ValueError(f"cells must be one of {', '.join(CELLS)}, got {cells!r}")
    return ("normal",) if cells == "normal" else ("normal", "reduce")


def selector(supernet: nn.Module, cell: str) -> torch.Tensor:
    """``S_nc - S_c`` for one cell type: ``+1`` for non-convolutions, ``-1`` for convolutions,
    shaped like that cell's alpha (edges x kept operations)."""
    switches = supernet.switches_normal if cell == "normal" else supernet.switches_reduce
    return torch.tensor([[-1.0 if op in CONVOLUTIONS else 1.0 for op in edge] for edge in switches])


def _alphas(supernet: nn.Module, cells: str) -> list[torch.Tensor]:
    return [supernet.alpha_normal if cell == "normal" else supernet.alpha_reduce for cell in _cell_names(cells)]


def adversarial_loss(supernet: nn.Module, x: torch.Tensor, y: torch.Tensor, *, cells: str = "normal",
                     create_graph: bool = True) -> torch.Tensor:
    """Eq. 2 on normalised inputs ``x``: ``sum (S_nc - S_c) * dL_xe/dalpha`` over the chosen cells.

    ``L_xe`` is the mean cross-entropy of the batch. The supernet's alphas must require grad.
    """
    loss = F.cross_entropy(supernet(x), y)
    alphas = _alphas(supernet, cells)
    grads = torch.autograd.grad(loss, alphas, create_graph=create_graph)
    total = x.new_zeros(())
    for cell, g in zip(_cell_names(cells), grads):
        total = total + (selector(supernet, cell).to(g.device, g.dtype) * g).sum()
    return total


def alpha_gradient_sums(supernet: nn.Module, x: torch.Tensor, y: torch.Tensor, *, cells: str = "normal",
                        train_mode: bool = True) -> dict[str, float]:
    """Diagnostics: the summed alpha gradient over convolution and over non-convolution operations,
    and Eq. 2, for normalised inputs ``x`` (on a private copy of the supernet)."""
    work = _alpha_copy(supernet, x.device, train_mode)
    loss = F.cross_entropy(work(x), y)
    grads = torch.autograd.grad(loss, _alphas(work, cells))
    conv = nonconv = 0.0
    for cell, g in zip(_cell_names(cells), grads):
        sel = selector(work, cell).to(g.device)
        conv += float(g[sel < 0].sum())
        nonconv += float(g[sel > 0].sum())
    return {"conv": conv, "nonconv": nonconv, "eq2": nonconv - conv}


def _alpha_copy(supernet: nn.Module, device: torch.device, train_mode: bool) -> nn.Module:
    """A :func:`crafting_copy` of ``supernet`` whose alphas alone take gradients (Eq. 2's)."""
    work = crafting_copy(supernet, device, train_mode)
    for alpha in work.arch_parameters():
        alpha.requires_grad_(True)
    return work


def default_lr(batch_size: int, std: Sequence[float], ensemble: int) -> float:
    """Witches' Brew's signed-Adam step ``0.1 * (batch / 512) / ensemble`` (normalised units),
    converted to pixel units by the mean channel std."""
    return 0.1 * (batch_size / 512.0) / ensemble * float(sum(std) / len(std))


class EnsembleObjective:
    """Algorithm 1's objective for :func:`.perturbation.optimise_perturbation`: the mean over
    batches of the ensemble-averaged ``L_adv`` (Eq. 2), and its gradient in the poisoned images.

    ``augment``: the generator the differentiable augmentation draws from (one draw per batch,
    shared by the ensemble), or None for no augmentation. Each supernet is backpropagated on its
    own, so that one graph at a time is in memory.
    """

    def __init__(self, ensemble: Sequence[nn.Module], labels: torch.Tensor, slices: Sequence[slice], *,
                 mean: Sequence[float], std: Sequence[float], device: torch.device, cells: str,
                 augment: torch.Generator | None, max_shift: float | None):
        self.ensemble, self.labels, self.slices = list(ensemble), labels, list(slices)
        self.mean = torch.tensor([float(m) for m in mean], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor([float(s) for s in std], device=device).view(1, -1, 1, 1)
        self.cells, self.generator, self.max_shift = cells, augment, max_shift

    def __call__(self, poisoned: torch.Tensor) -> tuple[float, torch.Tensor]:
        grad = torch.zeros_like(poisoned)
        total = 0.0
        for sl in self.slices:
            d = poisoned[sl].clone().requires_grad_(True)
            x = differentiable_augment(d, self.generator, max_shift=self.max_shift) if self.generator is not None else d
            x = (x - self.mean) / self.std
            batch_loss = 0.0
            for net in self.ensemble:
                loss = adversarial_loss(net, x, self.labels[sl], cells=self.cells) / len(self.ensemble)
                grad[sl] += torch.autograd.grad(loss, d, retain_graph=True)[0]
                batch_loss += float(loss.detach())
            total += batch_loss
        return total / len(self.slices), grad


def alpha_gradient_attack(
    supernets: Sequence[nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps_pixels: float,
    steps: int,
    lr: float | None = None,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device,
    seed: int,
    augment: bool = True,
    cells: str = "normal",
    max_shift: float | None = None,
    lr_decay: bool = True,
    train_mode: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """Craft the workshop paper's poisons (Algorithm 1) against an ensemble of supernets.

    ``images``: float [0, 1], ``P x C x H x W``; ``labels`` stay unchanged. The perturbation is
    bounded by ``eps_pixels / 255`` (``l_inf``) and kept in [0, 1]. ``lr`` is in pixel units
    (default :func:`default_lr`). ``augment`` applies :func:`differentiable_augment` (shift up
    to ``max_shift`` pixels, default 1/8 of the side, and flip) drawn from a generator seeded
    with ``seed``. Returns ``(poisoned images float on the CPU, history)``, ``history[t]`` the
    mean over batches of the ensemble-averaged ``L_adv`` at step ``t`` (on augmented inputs).
    """
    if not supernets:
        raise ValueError("supernets must hold at least one SuperNet")
    if not 0 <= eps_pixels <= 255:
        raise ValueError(f"eps_pixels must be in 0..255, got {eps_pixels}")
    if images.dim() != 4 or len(images) != len(labels) or len(images) == 0:
        raise ValueError("images must be a non-empty P x C x H x W tensor with one label per image")
    _cell_names(cells)
    device = torch.device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    ensemble = [_alpha_copy(net, device, train_mode) for net in supernets]
    clean = images.detach().to(device, torch.float32)
    objective = EnsembleObjective(
        ensemble, torch.as_tensor(labels).to(device, torch.int64), batch_slices(len(clean), batch_size),
        mean=mean, std=std, device=device, cells=cells, augment=generator if augment else None, max_shift=max_shift,
    )
    lr = default_lr(batch_size, std, len(ensemble)) if lr is None else float(lr)
    milestones = sorted({max(1, int(steps * f)) for f in (3 / 8, 5 / 8, 7 / 8)}) if lr_decay else []
    poisoned, history = optimise_perturbation(
        clean, objective, eps_pixels=eps_pixels, steps=steps, lr=lr, signed=True, lr_milestones=milestones,
        desc="alpha attack",
    )
    if history:
        log.info("alpha attack: L_adv %.4g -> %.4g over %d steps, ensemble of %d", history[0], history[-1], steps, len(ensemble))
    return poisoned, history


def craft_alpha_attack(
    dataset,
    victims: torch.Tensor,
    supernets: Sequence[nn.Module],
    *,
    eps: float = 16.0,
    steps: int = 250,
    lr: float | None = None,
    batch_size: int = 128,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    augment: bool = True,
    cells: str = "normal",
) -> PoisonSet:
    """The attack on an :class:`ImageDataset`: a :class:`PoisonSet` for ``victims`` (sorted) with
    unchanged labels and uint8 images published within ``eps``; ``header["crafting"]`` holds
    the loss history, the ensemble size and ``cells``."""
    victims = torch.as_tensor(victims, dtype=torch.int64).sort().values
    if mean is None or std is None:
        mean, std = channel_stats(dataset)
    clean_pixels = dataset.images[victims]
    poisoned, history = alpha_gradient_attack(
        supernets, clean_pixels.float() / 255.0, dataset.labels[victims], eps_pixels=eps, steps=steps, lr=lr,
        batch_size=batch_size, mean=mean, std=std, device=device, seed=seed, augment=augment, cells=cells,
    )
    return PoisonSet(
        indices=victims,
        labels=dataset.labels[victims].clone(),
        images=publish(poisoned * 255.0, clean_pixels.float(), eps),
        header={"crafting": {"alpha_history": history, "ensemble": len(supernets), "cells": cells}},
    )
