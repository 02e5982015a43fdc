"""GradPC (Sun et al. 2020, as in ``watml/plim``'s ``GradAttacker``): the target parameters of
gradient canceling (:mod:`.gradient_canceling`, TMLR Algorithm 2), and the gradient helpers the
two share.

GradPC is bounded gradient *ascent* on the training loss. Each step adds ``step_size * g / ||g||``
(``g`` the loss gradient at the target parameters, ``||.||`` the L2 norm over *all* target
parameters together) to a running offset, which is then projected onto the L2 ball of
radius ``epsilon`` around the original parameters (rescaled when it leaves the ball).
``epsilon`` is *absolute* (a parameter-space L2 radius, one norm over all target tensors),
the meaning of plim's ``eps`` (``GradPC/attacker.py``); ``relative=True`` instead makes it
``epsilon * ||theta_0||``. ``step_size`` is plim's ``attack_lr`` (default 1), one step per
batch over one pass of the training data (``GradPC/grad_attack.py``); with a step no
smaller than ``epsilon`` the first step already reaches the sphere and later steps turn
the offset along it.

The value of ``epsilon`` the audit used, and the evidence for it, are in :mod:`.gradient_canceling`.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.progress import progress
from .perturbation import crafting_copy

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def classification_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's (main) logits; an :class:`EvalNetwork`'s auxiliary logits are ignored."""
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    return F.cross_entropy(logits, y)


def parameter_names(model: nn.Module, params: Iterable[torch.Tensor]) -> list[str]:
    """The names (as in ``named_parameters``) of parameters given as tensors of ``model``."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for p in params:
        if id(p) not in by_id:
            raise ValueError(f"a target parameter of shape {tuple(p.shape)} is not a parameter of the model")
        names.append(by_id[id(p)])
    if len(set(names)) != len(names):
        raise ValueError("a target parameter is listed twice")
    return names


def parameter_gradients(loss: torch.Tensor, theta: Sequence[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, theta, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, theta)]


def global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


def _cycle(loader: Iterable, steps: int):
    done = 0
    while done < steps:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            done += 1
            if done == steps:
                return
        if empty:
            raise ValueError("the loader yielded no batches")


def gradpc_target(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    loss_fn: LossFn | None,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    epsilon: float = 1.0,
    steps: int | None = None,
    step_size: float = 1.0,
    relative: bool = False,
    device: str | torch.device | None = None,
    train_mode: bool = True,
) -> list[torch.Tensor]:
    """GradPC: target values for ``params`` (a subset of ``model``'s parameters) that increase
    the training loss while staying within L2 distance ``epsilon`` of the current values.

    ``loader`` yields *normalised* ``(x, y)`` batches (a :class:`BatchLoader`); one ascent step
    per batch, ``steps`` batches in all (default: one pass, ``len(loader)``, as the reference),
    cycling through the loader if needed. Returns detached tensors aligned with ``params``
    (on their devices); ``model`` is not modified.
    """
    if epsilon < 0 or step_size <= 0:
        raise ValueError(f"epsilon must be >= 0 and step_size > 0, got {epsilon}, {step_size}")
    loss_fn = loss_fn or classification_loss
    names = parameter_names(model, params)
    device = torch.device(device) if device is not None else next(iter(params)).device
    steps = len(loader) if steps is None else int(steps)  # type: ignore[arg-type]
    work = crafting_copy(model, device, train_mode)
    own = dict(work.named_parameters())
    theta = [own[name].requires_grad_(True) for name in names]
    origin = [t.detach().clone() for t in theta]
    radius = float(epsilon) * (float(global_norm(origin)) if relative else 1.0)
    offset = [torch.zeros_like(t) for t in theta]
    first = last = None
    for x, y in progress(_cycle(loader, steps), desc="GradPC steps", total=steps):
        x, y = x.to(device), y.to(device)
        loss = loss_fn(work, x, y)
        first = loss.item() if first is None else first
        last = loss.item()
        grads = parameter_gradients(loss, theta)
        norm = float(global_norm(grads))
        if norm == 0.0 or not math.isfinite(norm):
            continue
        with torch.no_grad():
            for o, g in zip(offset, grads):
                o.add_(g, alpha=step_size / norm)
            size = float(global_norm(offset))
            if size > radius:
                for o in offset:
                    o.mul_(radius / size)
            for t, t0, o in zip(theta, origin, offset):
                t.copy_(t0 + o)
    log.info("GradPC: %d steps, batch loss %.4f -> %.4f, ||offset|| %.4g (radius %.4g)",
             steps, first or float("nan"), last or float("nan"), float(global_norm(offset)), radius)
    return [t.detach().clone().to(p.device) for t, p in zip(theta, params)]
