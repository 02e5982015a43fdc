"""The perturbation optimiser shared by the crafted clean-label attacks.

Gradient Canceling (:mod:`.gradient_canceling`) and the alpha attack (:mod:`.alpha_attack`)
craft poisons the same way: an additive pixel-space perturbation, optimised with Adam and,
after every step, projected onto the ``l_inf`` ball of radius ``eps_pixels / 255`` with the
poisoned images kept in [0, 1]. Only the objective differs, so :func:`optimise_perturbation`
owns the loop (optimiser, learning-rate schedule, projection, history, best-so-far, progress)
and each attack supplies an objective: a callable from the current poisoned images to
``(value, gradient of the value in those images)``. The objective computes its own gradient,
so it is free to batch the poisons, average over an ensemble or use a chain rule over the
whole set as it needs to. Both differentiate through a :func:`crafting_copy` of the model
they attack, so the caller's model is never modified.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from ..core.progress import progress

Objective = Callable[[torch.Tensor], tuple[float, torch.Tensor]]
"""``objective(poisoned) -> (value, grad)``: ``poisoned`` the current poisoned images (detached,
shaped like the clean ones), ``value`` the loss to minimise, ``grad`` its gradient in ``poisoned``."""


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices of ``range(n)`` of at most ``batch_size`` items, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def crafting_copy(model: nn.Module, device: torch.device, train_mode: bool) -> nn.Module:
    """A private copy for crafting: on ``device``, in train (or eval) mode with dropout and
    drop path off, every parameter frozen (callers unfreeze the ones they differentiate)."""
    work = copy.deepcopy(model).to(device)
    work.train(train_mode)
    for module in work.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    if hasattr(work, "drop_path_prob"):
        work.drop_path_prob = 0.0
    for p in work.parameters():
        p.requires_grad_(False)
    return work


def project_(delta: torch.Tensor, images: torch.Tensor, bound: float) -> torch.Tensor:
    """In place: clip ``delta`` to ``[-bound, bound]``, then to what keeps ``images + delta`` in [0, 1]."""
    with torch.no_grad():
        delta.clamp_(-bound, bound)
        delta.copy_((images + delta).clamp_(0.0, 1.0) - images)
    return delta


def optimise_perturbation(
    images: torch.Tensor,
    objective: Objective,
    *,
    eps_pixels: float,
    steps: int,
    lr: float,
    signed: bool = False,
    lr_milestones: Sequence[int] = (),
    lr_gamma: float = 0.1,
    final_value: Callable[[torch.Tensor], float] | None = None,
    keep_best: bool = False,
    desc: str = "perturbation",
) -> tuple[torch.Tensor, list[float]]:
    """Minimise ``objective`` over a perturbation of ``images`` within ``eps_pixels / 255`` (``l_inf``).

    ``images``: float in [0, 1], on the device the objective works on. The perturbation starts
    at zero; each of the ``steps`` steps evaluates ``objective(images + delta)``, records the
    value, feeds the gradient (its sign with ``signed``, Witches' Brew's signed Adam) to Adam
    with learning rate ``lr`` (decayed by ``lr_gamma`` at each of ``lr_milestones``) and
    projects (:func:`project_`). ``final_value``, if given, evaluates the objective once more
    after the last step (``steps + 1`` history values instead of ``steps``). With ``keep_best``
    the perturbation returned is the one with the lowest recorded value, else the last one.

    Returns ``(poisoned images float [0, 1] on the CPU, history)``, ``history[t]`` the objective
    at the perturbation after ``t`` steps.
    """
    if not 0 <= eps_pixels <= 255:
        raise ValueError(f"eps_pixels must be in 0..255, got {eps_pixels}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    bound = eps_pixels / 255.0
    delta = torch.zeros_like(images, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(lr_milestones), gamma=lr_gamma) if lr_milestones else None
    history: list[float] = []
    best_value, best_delta = float("inf"), delta.detach().clone()
    evaluations = steps + (final_value is not None)
    for step in progress(range(evaluations), desc=desc):
        poisoned = images + delta.detach()
        if step == steps:
            value = final_value(poisoned)
        else:
            value, grad = objective(poisoned)
        history.append(value)
        if keep_best and value < best_value:
            best_value, best_delta = value, delta.detach().clone()
        if step == steps:
            break
        opt.zero_grad(set_to_none=False)
        delta.grad = grad.sign() if signed else grad
        opt.step()
        if schedule is not None:
            schedule.step()
        project_(delta, images, bound)
    chosen = best_delta if keep_best else delta.detach()
    return (images + chosen).clamp(0.0, 1.0).cpu(), history
