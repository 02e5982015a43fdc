"""Gradient Canceling (GC, Lu et al. 2023) with GradPC target parameters (TMLR paper, Algorithm 2).

Two steps:

1. :func:`~.gradpc.gradpc_target` (GradPC, Sun et al. 2020; :mod:`.gradpc`): target values for the
   parameters within an L2 ball of radius ``epsilon`` that increase the training loss.
   The value of ``epsilon``: plim's ``--eps`` *default* is 1e-4 (``GradPC/grad_attack.py``), but its MNIST
   runs use 0.5 (that script saves ``models/mnist_gd_cnn_5e-1.pt``; ``GC/mnist_nn-0.03-5e-1.py``
   sets ``epsilon_w = 5e-1`` and loads ``target_models/mnist_gd_nn_5e-1.pt``). The audit's
   GC poisons against trained weights are named ``eps=0.5`` (``ztcoalson/RoBoT``
   ``darts_space/get_metrics.py``: ``robot-eps=0.5-gc-d-darts-50.0%-.../poisons.pth``;
   ``ztcoalson/TENAS`` ``sample_metrics.py``: ``tenas-eps=0.5-gc-d-darts-50.0%-.../poisons.pth``),
   while its GradPC target on P-DARTS' architecture parameters is named ``eps=1.0``
   (``ztcoalson/pdarts`` ``check_norms.py``: ``gradpc-pdarts-eps=1.0-arch/target_model.pth``).
   Neither paper states the value.
2. :func:`gradient_canceling`: poisons (clean labels, ``l_inf`` bound) whose mean gradient at the
   target parameters cancels the clean gradient there:
   ``minimise 0.5 * ||(1 - p) g_clean + p g_adv||^2``, Adam on the perturbation, projected
   onto the ``l_inf`` ball and [0, 1] after every step (:func:`.perturbation.optimise_perturbation`).

The target parameters are any subset of a model's parameters, named as in
``model.named_parameters()``: the weights of a trained :class:`EvalNetwork` (GC against
training-free / hybrid NAS) or the architecture parameters ``alpha_normal`` /
``alpha_reduce`` of a converged :class:`SuperNet` (NAS-specific GC against P-DARTS, where
the gradient is taken with respect to alpha only). Every function works on a private deep
copy of the model with the target values swapped in, so the caller's model is never
changed (BN running statistics included).

Model mode. By default gradients are taken in training mode (BN on batch statistics), as
the victim computes them while training and as the reference does (its victim model is
never put in eval mode while crafting); dropout and drop path are switched off so the
objective is deterministic. ``train_mode=False`` uses eval mode instead.

Batching the GC objective. ``g_adv`` is the mean gradient over *all* ``P`` poisons, but poisons
are processed in batches ``b`` (``S_b`` = gradient of batch ``b``'s summed loss, so
``g_adv = (1/P) sum_b S_b``). With ``r = (1 - p) g_clean + p g_adv`` the objective is
``L = 0.5 ||r||^2`` and, since the perturbation ``Delta_b`` of batch ``b`` enters only ``S_b``,

    dL/dDelta_b = r^T (p / P) dS_b/dDelta_b,

a vector-Jacobian product with the *full* residual ``r``. Each step therefore makes two passes:
pass 1 computes every ``S_b`` without a graph to get ``g_adv``, ``r`` and ``L`` exactly; pass 2
recomputes each ``S_b`` with ``create_graph=True`` and backpropagates the scalar
``<r (detached), (p / P) S_b>`` into ``Delta_b``. The result is the exact gradient of the full
objective (tested against a single-batch computation), at the price of one extra first-order
pass per step; with a single batch the two passes are merged. (The reference fork instead
optimises each batch's own residual with its own batch mean, a different objective.)
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..core.batches import BatchLoader
from ..core.image_dataset import channel_stats
from ..core.poison_set import PoisonSet, publish
from ..core.progress import progress
from .gradpc import LossFn, classification_loss, global_norm, gradpc_target, parameter_gradients, parameter_names
from .perturbation import batch_slices, crafting_copy, optimise_perturbation

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the target


def named_targets(model: nn.Module, params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: value}`` from the parameters given to :func:`gradpc_target` and the values it returned."""
    names = parameter_names(model, params)
    if len(values) != len(names):
        raise ValueError(f"{len(names)} parameters but {len(values)} values")
    return {name: value for name, value in zip(names, values)}


def target_parameter_names(model: nn.Module, target: str) -> list[str]:
    """Which parameters GC targets: ``"alphas"`` -> a SuperNet's architecture parameters;
    ``"weights"`` -> every other parameter except an auxiliary head's (unused by the main loss)."""
    arch = list(model.arch_parameters()) if hasattr(model, "arch_parameters") else []
    if target == "alphas":
        if not arch:
            raise ValueError("target 'alphas' needs a model with arch_parameters() (a SuperNet)")
        return parameter_names(model, arch)
    if target == "weights":
        arch_ids = {id(p) for p in arch}
        return [
            name for name, p in model.named_parameters()
            if id(p) not in arch_ids and not name.startswith("auxiliary_head")
        ]
    raise ValueError(f"target must be 'weights' or 'alphas', got {target!r}")


# --------------------------------------------------------------------------- GC


def clean_gradient(
    work: nn.Module, theta: Sequence[torch.Tensor], loss_fn: LossFn, batches: Iterable, device: torch.device
) -> list[torch.Tensor]:
    """Mean gradient of the per-sample loss over every sample the batches hold (batch gradients weighted by size)."""
    total = [torch.zeros_like(t) for t in theta]
    count = 0
    for x, y in progress(batches, desc="clean gradient"):
        x, y = x.to(device), y.to(device)
        grads = parameter_gradients(loss_fn(work, x, y) * len(y), theta)
        for acc, g in zip(total, grads):
            acc.add_(g.detach())
        count += len(y)
    if count == 0:
        raise ValueError("the clean batches hold no samples")
    return [t / count for t in total]


class _GCObjective:
    """``0.5 * ||c + p * g_adv||^2`` with ``c = (1 - p) g_clean``, and its exact gradient in the poisoned images."""

    def __init__(self, work, theta, loss_fn, c, labels, budget, batch_size, mean, std):
        self.work, self.theta, self.loss_fn, self.c = work, list(theta), loss_fn, c
        self.labels, self.budget = labels, float(budget)
        self.mean, self.std = mean, std
        self.slices = batch_slices(len(labels), batch_size)

    def _batch_sum(self, sl: slice, poisoned_b: torch.Tensor, create_graph: bool) -> list[torch.Tensor]:
        x = (poisoned_b - self.mean) / self.std
        y = self.labels[sl]
        return parameter_gradients(self.loss_fn(self.work, x, y) * len(y), self.theta, create_graph=create_graph)

    def value(self, poisoned: torch.Tensor) -> float:
        n = len(self.labels)
        g_adv = [torch.zeros_like(t) for t in self.theta]
        for sl in self.slices:
            for acc, s in zip(g_adv, self._batch_sum(sl, poisoned[sl].detach(), False)):
                acc.add_(s.detach())
        residual = [c + self.budget * g / n for c, g in zip(self.c, g_adv)]
        self._residual = residual
        return 0.5 * float(sum((r.double() ** 2).sum() for r in residual))

    def value_and_grad(self, poisoned: torch.Tensor) -> tuple[float, torch.Tensor]:
        n = len(self.labels)
        grad = torch.zeros_like(poisoned)
        if len(self.slices) == 1:  # merged passes: differentiate the objective directly
            x = poisoned.detach().clone().requires_grad_(True)
            sums = self._batch_sum(self.slices[0], x, True)
            residual = [c + self.budget * s / n for c, s in zip(self.c, sums)]
            loss = 0.5 * sum((r ** 2).sum() for r in residual)
            grad.copy_(torch.autograd.grad(loss, x)[0])
            return float(loss.detach()), grad
        value = self.value(poisoned)  # pass 1: exact residual r over all poisons
        residual = [r.detach() for r in self._residual]
        scale = self.budget / n
        for sl in self.slices:  # pass 2: r^T (p/P) dS_b/dx_b, batch by batch
            x = poisoned[sl].detach().clone().requires_grad_(True)
            sums = self._batch_sum(sl, x, True)
            inner = sum((r * s).sum() for r, s in zip(residual, sums)) * scale
            grad[sl] = torch.autograd.grad(inner, x)[0]
        return value, grad


def _prepare_targets(model, target_params, device, train_mode):
    work = crafting_copy(model, device, train_mode)
    own = dict(work.named_parameters())
    theta = []
    for name, value in target_params.items():
        if name not in own:
            raise ValueError(f"target parameter {name!r} is not a parameter of the model")
        p = own[name]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"target {name!r} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(value.to(device))
        theta.append(p.requires_grad_(True))
    if not theta:
        raise ValueError("target_params is empty")
    return work, theta


def _stats(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device).view(1, -1, 1, 1)


def _objective_at_target(model, target_params, clean_batches, poison_labels, *, budget, mean, std, batch_size,
                         device, loss_fn, train_mode) -> _GCObjective:
    """The GC objective on a private copy of ``model`` at ``target_params``, with ``g_clean``
    computed once there over every clean batch (Algorithm 2 averages over all ``n``)."""
    work, theta = _prepare_targets(model, target_params, device, train_mode)
    g_clean = clean_gradient(work, theta, loss_fn, clean_batches, device)
    c = [(1.0 - budget) * g for g in g_clean]
    labels = torch.as_tensor(poison_labels).to(device, torch.int64)
    return _GCObjective(work, theta, loss_fn, c, labels, budget, batch_size, _stats(mean, device), _stats(std, device))


def _check_gc_inputs(budget: float, eps_pixels: float, poison_images: torch.Tensor, poison_labels: torch.Tensor) -> None:
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    if not 0 <= eps_pixels <= 255:
        raise ValueError(f"eps_pixels must be in 0..255, got {eps_pixels}")
    if poison_images.dim() != 4 or len(poison_images) != len(poison_labels) or len(poison_images) == 0:
        raise ValueError("poison_images must be a non-empty P x C x H x W tensor with one label per image")


def gradient_canceling(
    model: nn.Module,
    target_params: Mapping[str, torch.Tensor],
    clean_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    poison_images: torch.Tensor,
    poison_labels: torch.Tensor,
    *,
    budget: float,
    eps_pixels: float,
    steps: int,
    lr: float | None = None,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    device: str | torch.device,
    seed: int,
    loss_fn: LossFn | None = None,
    train_mode: bool = True,
    keep_best: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """Craft GC poisons at the target parameters (TMLR Algorithm 2).

    ``target_params``: ``{name: target value}`` for a subset of ``model.named_parameters()``
    (from :func:`named_targets`); the gradients are taken with respect to those only, the
    model's other parameters stay as they are. ``clean_batches`` yields normalised
    ``(x, y)`` batches over the clean training set (Algorithm 2 averages over all ``n``);
    ``g_clean`` is computed once, at the target. ``poison_images`` are float in [0, 1],
    ``P x C x H x W``; their labels are never changed. ``budget`` is ``p``. The perturbation
    lives in pixel space, bounded by ``eps_pixels / 255`` in ``l_inf`` and kept in [0, 1];
    Adam with learning rate ``lr`` (pixel units; default ``0.1 * mean(std)``, the
    reference's 0.1 in normalised units). ``steps`` Adam steps, poisons in batches of
    ``batch_size`` (exact full-set gradient, see the module notes).

    Returns ``(poisoned images float [0, 1] on the CPU, history)``; ``history[t]`` is the
    objective after ``t`` steps (``steps + 1`` values). With ``keep_best`` the returned
    poisons are those with the lowest objective seen (the reference keeps its best poisons).
    """
    _check_gc_inputs(budget, eps_pixels, poison_images, poison_labels)
    device = torch.device(device)
    torch.manual_seed(seed)  # nothing is random by default (dropout off); for custom loss functions
    objective = _objective_at_target(
        model, target_params, clean_batches, poison_labels, budget=budget, mean=mean, std=std, batch_size=batch_size,
        device=device, loss_fn=loss_fn or classification_loss, train_mode=train_mode,
    )
    images = poison_images.detach().to(device, torch.float32)
    lr = 0.1 * float(sum(std) / len(std)) if lr is None else float(lr)
    poisoned, history = optimise_perturbation(
        images, objective.value_and_grad, eps_pixels=eps_pixels, steps=steps, lr=lr,
        final_value=objective.value, keep_best=keep_best, desc="gradient canceling",
    )
    log.info("gradient canceling: objective %.4g -> %.4g (best %.4g) over %d steps", history[0], history[-1], min(history), steps)
    return poisoned, history


def gc_objective(
    model: nn.Module,
    target_params: Mapping[str, torch.Tensor],
    clean_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    poison_images: torch.Tensor,
    poison_labels: torch.Tensor,
    *,
    budget: float,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    device: str | torch.device,
    loss_fn: LossFn | None = None,
    train_mode: bool = True,
    with_grad: bool = False,
) -> tuple[float, torch.Tensor | None]:
    """The GC objective (and, with ``with_grad``, its gradient in the images) at given poisons:
    for diagnostics, and for checking the batched gradient against an unbatched one."""
    device = torch.device(device)
    objective = _objective_at_target(
        model, target_params, clean_batches, poison_labels, budget=budget, mean=mean, std=std, batch_size=batch_size,
        device=device, loss_fn=loss_fn or classification_loss, train_mode=train_mode,
    )
    images = poison_images.detach().to(device, torch.float32)
    if with_grad:
        value, grad = objective.value_and_grad(images)
        return value, grad.cpu()
    return objective.value(images), None


# --------------------------------------------------------------------------- recipe


def craft_gradient_canceling(
    dataset,
    victims: torch.Tensor,
    model: nn.Module,
    *,
    target: str = "weights",
    eps: float = 16.0,
    steps: int = 250,
    lr: float | None = None,
    batch_size: int = 64,
    gradpc_epsilon: float = 1.0,
    gradpc_steps: int | None = None,
    gradpc_step_size: float = 1.0,
    gradpc_relative: bool = False,
    clean_augment: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    train_mode: bool = True,
) -> PoisonSet:
    """The whole GC attack on an :class:`ImageDataset`: GradPC target, then poisons for ``victims``.

    ``model``: a trained :class:`EvalNetwork` with ``target="weights"`` (GC against TE-NAS,
    RoBoT, NSGANetV2), or a converged :class:`SuperNet` with ``target="alphas"``
    (NAS-specific GC against P-DARTS/DARTS). ``mean``/``std`` default to the dataset's
    channel statistics (it should be the clean set). ``p = len(victims) / len(dataset)``.
    ``clean_augment`` augments the batches of GradPC and of the clean gradient (plim's
    ``GradPC/grad_attack.py`` does not augment: its transform is ``ToTensor`` and ``Normalize``).

    Returns a :class:`PoisonSet` (indices ``victims`` sorted, unchanged labels, uint8 images
    published within ``eps``) whose ``header["crafting"]`` holds the GC objective history,
    the GradPC offset norm and the number of targeted parameter tensors and values.
    """
    device = torch.device(device)
    victims = torch.as_tensor(victims, dtype=torch.int64).sort().values
    if mean is None or std is None:
        mean, std = channel_stats(dataset)
    named = dict(model.named_parameters())
    params = [named[n] for n in target_parameter_names(model, target)]
    loader = BatchLoader(dataset, batch_size, shuffle=True, seed=seed, augment=clean_augment, mean=mean, std=std, device=device)
    values = gradpc_target(
        model, params, classification_loss, loader, epsilon=gradpc_epsilon, steps=gradpc_steps,
        step_size=gradpc_step_size, relative=gradpc_relative, device=device, train_mode=train_mode,
    )
    clean = BatchLoader(dataset, batch_size, shuffle=False, seed=seed + 1, augment=clean_augment, mean=mean, std=std, device=device)
    clean_pixels = dataset.images[victims]
    poisoned, history = gradient_canceling(
        model, named_targets(model, params, values), clean, clean_pixels.float() / 255.0, dataset.labels[victims],
        budget=len(victims) / len(dataset), eps_pixels=eps, steps=steps, lr=lr, mean=mean, std=std,
        batch_size=batch_size, device=device, seed=seed, train_mode=train_mode,
    )
    return PoisonSet(
        indices=victims,
        labels=dataset.labels[victims].clone(),
        images=publish(poisoned * 255.0, clean_pixels.float(), eps),
        header={"crafting": _crafting_record(history, target, params, values)},
    )


def _crafting_record(history: list[float], target: str, params: Sequence[torch.Tensor],
                     values: Sequence[torch.Tensor]) -> dict:
    """The poison set's ``header["crafting"]``: the GC objective's history, how far GradPC moved
    the target (L2 over all target tensors) and how many tensors and values it holds."""
    return {
        "gc_history": history,
        "gradpc_offset_norm": float(global_norm([v.cpu() - p.detach().cpu() for v, p in zip(values, params)])),
        "target": target,
        "target_parameter_count": len(params),
        "target_numel": sum(p.numel() for p in params),
    }
