"""DARTS: differentiable architecture search (Liu et al., 2019), and its anti-search.

Bi-level optimisation as in ``quark0/darts`` ``train_search.py``: for every weight batch,
first an architecture step on a batch of the architecture half (Adam on alpha), then a
weight step on the weight half (SGD with momentum, gradient clipping, cosine schedule).

The architecture gradient comes in the reference's two orders:

* first order (``order=1``): the gradient of the validation loss with respect to alpha at
  the current weights;
* second order (``order=2``, ``cnn/architect.py`` ``_backward_step_unrolled``): the
  gradient of the validation loss at the weights after one virtual SGD step on the
  training batch, ``w' = w - eta * (momentum * buffer + dL_train/dw + wd * w)``, where the
  dependence of ``w'`` on alpha enters through a finite-difference Hessian-vector product.

Anti-search (workshop paper, Section 3.3) runs the same search with the architecture
gradient negated, so alpha moves towards the operations that *increase* the loss.

P-DARTS (:mod:`nbutils.nas.pdarts`) trains its stages with the same epoch, :func:`train_epoch`;
everything below :func:`darts_search` is shared by the two algorithms.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationInfo, field_validator

from ..core.config import (Cells, Channels, NonNegativeInt, NonNegativeNumber, Order, PositiveInt, PositiveNumber, Rate,
                           config, keyed, keyed_when_changed, set_by_run)
from ..core.batches import BatchLoader
from ..core.image_dataset import ImageDataset, channel_stats, concatenate
from ..core.device import MixedPrecision
from ..core.progress import progress
from ..accel.supernet_choice import supernet_class
from ..space.supernet import SuperNet
from ..training.recipe import SgdSettings
from .darts_unrolled import unrolled_alpha_grad
from .search_result import SearchResult

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


class SearchDiverged(RuntimeError):
    """The search produced a NaN/inf loss or alpha; the trial must not be retrained."""


@config
class DartsConfig(SgdSettings):
    """DARTS' settings; the defaults are the reference's (``train_search.py``). The weights' SGD
    settings (:class:`~nbutils.training.recipe.SgdSettings`) and the fields up to ``warmup_epochs``
    are what search.yaml's ``darts:`` sets; the run sets the rest for each search."""

    epochs: PositiveInt = keyed(50)
    channels: Channels = keyed(16)
    layers: Cells = keyed(8)
    batch_size: PositiveInt = keyed(64)
    lr_min: NonNegativeNumber = keyed(0.001)
    arch_lr: PositiveNumber = keyed(3e-4)
    arch_betas: tuple[Rate, Rate] = keyed((0.5, 0.999))
    arch_weight_decay: NonNegativeNumber = keyed(1e-3)
    order: Order = keyed(1)   # 1: first-order architecture gradient; 2: second order (unrolled)
    # first epochs train the weights only (the reference: 0, see darts_search)
    warmup_epochs: NonNegativeInt = keyed_when_changed(0)
    # set by the run
    augment: bool = set_by_run(True)
    anti: bool = set_by_run(False)
    fast: bool = set_by_run(True)   # the fast supernet (same function and parameters as the plain one), on the CPU only
    # keep the supernet after these epochs (0: before training)
    keep_epochs: tuple[NonNegativeInt, ...] = set_by_run(())
    mixed_precision: bool = set_by_run(False)   # CUDA only: float16 autocast with gradient scaling (first order only)

    @field_validator("keep_epochs")
    @classmethod
    def _kept_epochs_exist(cls, keep_epochs: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        epochs = info.data.get("epochs")
        if epochs is not None and any(e > epochs for e in keep_epochs):
            raise ValueError(f"must lie in 0..epochs ({epochs})")
        return keep_epochs

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_within_search(cls, warmup_epochs: int, info: ValidationInfo) -> int:
        epochs = info.data.get("epochs")
        if epochs is not None and warmup_epochs >= epochs:
            raise ValueError(f"must be less than epochs ({epochs}): alpha needs at least one epoch")
        return warmup_epochs

    @field_validator("mixed_precision")
    @classmethod
    def _first_order_only(cls, mixed_precision: bool, info: ValidationInfo) -> bool:
        return first_order_only(mixed_precision, info)


@dataclass(frozen=True)
class StepRule:
    """How the steps of one epoch run."""

    arch_step: bool = True                 # False: weights only (P-DARTS warm-up epochs)
    order: int = 1                         # 1 or 2, see the module docstring
    anti: bool = False                     # negate alpha's gradient
    grad_clip: float = 5.0                 # norm clip of the weight gradient
    arch_grad_clip: float | None = None    # norm clip of alpha's gradient (P-DARTS); None: none (DARTS)


class Precision:
    """Mixed precision for the search steps (:class:`nbutils.core.device.MixedPrecision`) with one
    gradient scaler for the weights and one for alpha (their gradients have different scales)."""

    def __init__(self, mode: MixedPrecision = MixedPrecision()):
        self.mode, self.enabled = mode, mode.enabled
        self.weights, self.alpha = mode.scaler(), mode.scaler()

    def autocast(self):
        return self.mode.autocast()


FLOAT32 = Precision()


def _widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if autocast made it half precision, else as it is."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def first_order_only(mixed_precision: bool, info: ValidationInfo) -> bool:
    """The check of a search config's ``mixed_precision`` against its ``order`` (declared before it)."""
    if mixed_precision and info.data.get("order") == 2:
        raise ValueError("supports the first-order search only (order: 1): the second-order "
                         "step's finite differences need float32")
    return mixed_precision


def snapshot_epochs(epochs: int, snapshots: int) -> list[int]:
    """``snapshots`` epochs evenly spaced over 0..epochs, both ends included when ``snapshots`` >= 2
    (50 epochs, 6 snapshots: 0, 10, ..., 50, the workshop paper's e=6 ensemble); 1: the last."""
    if snapshots < 0:
        raise ValueError(f"snapshots must be >= 0, got {snapshots}")
    if snapshots == 0:
        return []
    if snapshots == 1:
        return [epochs]
    return sorted({round(i * epochs / (snapshots - 1)) for i in range(snapshots)})


def darts_search(
    weight_part: ImageDataset,
    arch_part: ImageDataset,
    config: DartsConfig,
    *,
    seed: int,
    device: torch.device,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> SearchResult:
    """Search on (possibly poisoned) data; returns the genotype, the per-epoch history and alpha.

    ``normalisation`` is the per-channel (mean, std) of the inputs; like the reference's fixed
    dataset constants it should come from clean data, so that poisons cannot shift it. By
    default it is computed from the two halves together.

    ``config.warmup_epochs`` first epochs train the weights only, as P-DARTS' stages begin. The
    reference DARTS has none; a short search needs them: while the operations' weights are
    still untrained, the parameter-free operations lower the loss most, so alpha moves towards
    pooling (and anti-search towards convolutions) before the search sees what trained
    operations do, the phase a 50-epoch search soon leaves behind.
    """
    torch.manual_seed(seed)
    model = supernet_class(config.fast, device)(
        channels=config.channels,
        num_classes=weight_part.num_classes,
        layers=config.layers,
        in_channels=weight_part.in_channels,
        seed=seed,
    ).to(device)
    w_opt, schedule, a_opt = make_optimisers(model, config)
    train_loader, arch_loader = search_loaders(
        weight_part, arch_part, config.batch_size, augment=config.augment, seed=seed, device=device,
        normalisation=normalisation,
    )
    precision = Precision(MixedPrecision.for_device(config.mixed_precision, device, "searching"))

    result = SearchResult(genotype=model.genotype())
    keep = set(config.keep_epochs)
    if 0 in keep:
        result.supernets[0] = model.checkpoint()
    trace = {"alpha_normal": [], "alpha_reduce": []}
    for epoch in progress(range(config.epochs), desc="search epochs"):
        lr = w_opt.param_groups[0]["lr"]   # the rate this epoch trains with
        rule = StepRule(arch_step=epoch >= config.warmup_epochs, order=config.order, anti=config.anti,
                        grad_clip=config.grad_clip)
        stats = train_epoch(model, w_opt, a_opt, train_loader, arch_loader, rule, where=f"epoch {epoch + 1}",
                            precision=precision)
        schedule.step()
        for name, value in model.alphas_numpy().items():
            trace[name].append(value)
        genotype = model.genotype()
        result.history.append({"epoch": epoch + 1, "lr": lr, **stats, "genotype": genotype.to_dict()})
        log.info("epoch %d: train acc %.3f, val acc %s, %s", epoch + 1, stats["train_acc"],
                 "-" if stats["val_acc"] is None else f"{stats['val_acc']:.3f}", genotype.summary())
        if epoch + 1 in keep:
            result.supernets[epoch + 1] = model.checkpoint()
    result.genotype = model.genotype()
    result.arrays = {name: np.stack(values) for name, values in trace.items()}
    return result


# --------------------------------------------------------------------------- set-up


def make_optimisers(
    model: SuperNet, config
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR, torch.optim.Adam]:
    """SGD with momentum on the weights (cosine from ``lr`` to ``lr_min`` over ``epochs``) and
    Adam on alpha. ``config`` is a :class:`DartsConfig` or a ``PdartsConfig``: any object with
    those fields and ``momentum``, ``weight_decay``, ``arch_lr``, ``arch_betas``, ``arch_weight_decay``."""
    w_opt = torch.optim.SGD(list(model.weights()), config.lr, momentum=config.momentum,
                            weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, config.epochs, eta_min=config.lr_min)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=config.arch_lr, betas=tuple(config.arch_betas),
                             weight_decay=config.arch_weight_decay)
    return w_opt, schedule, a_opt


def search_loaders(
    weight_part: ImageDataset,
    arch_part: ImageDataset,
    batch_size: int,
    *,
    augment: bool,
    seed: int,
    device: torch.device,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> tuple[BatchLoader, BatchLoader]:
    """Shuffled loaders of the weight half (seed ``seed``) and the architecture half (``seed + 1``)."""
    mean, std = normalisation or channel_stats(concatenate(weight_part, arch_part))
    common = dict(shuffle=True, augment=augment, mean=mean, std=std, device=device)
    return (BatchLoader(weight_part, batch_size, seed=seed, **common),
            BatchLoader(arch_part, batch_size, seed=seed + 1, **common))


# --------------------------------------------------------------------------- one epoch


def train_epoch(
    model: SuperNet,
    w_opt: torch.optim.Optimizer,
    a_opt: torch.optim.Optimizer,
    train_loader: BatchLoader,
    arch_loader: BatchLoader,
    rule: StepRule,
    *,
    where: str,
    precision: Precision = FLOAT32,
) -> dict[str, float | None]:
    """One pass over the weight half: per batch an architecture step (unless ``rule.arch_step``
    is off) on the next batch of the architecture half, then a weight step.

    Returns the mean training loss and accuracy of the weight steps and the mean validation
    loss and accuracy of the architecture steps (None without architecture steps), and the
    number of each kind of step (a search's length is its steps, not its epochs). With
    ``order=2`` the validation figures are at the unrolled weights, the objective of that step.
    Raises :class:`SearchDiverged` (naming ``where``) on a non-finite loss or alpha.
    """
    model.train()
    sums = {"train_loss": 0.0, "train_correct": 0, "train_n": 0, "val_loss": 0.0, "val_correct": 0, "val_n": 0,
            "weight_steps": 0, "arch_steps": 0}
    arch_batches = iter(arch_loader) if rule.arch_step else None
    for x, y in train_loader:
        loss_val = None
        if rule.arch_step:
            try:
                x_val, y_val = next(arch_batches)
            except StopIteration:
                arch_batches = iter(arch_loader)
                x_val, y_val = next(arch_batches)
            loss_val, logits_val = architecture_step(model, a_opt, w_opt, (x, y), (x_val, y_val), rule, precision)
        loss, logits = weight_step(model, w_opt, (x, y), rule.grad_clip, precision)
        _check_finite(loss, loss_val, model, where)

        sums["weight_steps"] += 1
        sums["arch_steps"] += loss_val is not None
        sums["train_loss"] += loss.item() * len(y)
        sums["train_correct"] += (logits.argmax(1) == y).sum().item()
        sums["train_n"] += len(y)
        if loss_val is not None:
            sums["val_loss"] += loss_val.item() * len(y_val)
            sums["val_correct"] += (logits_val.argmax(1) == y_val).sum().item()
            sums["val_n"] += len(y_val)
    has_val = sums["val_n"] > 0
    return {
        "train_loss": sums["train_loss"] / sums["train_n"],
        "train_acc": sums["train_correct"] / sums["train_n"],
        "val_loss": sums["val_loss"] / sums["val_n"] if has_val else None,
        "val_acc": sums["val_correct"] / sums["val_n"] if has_val else None,
        "weight_steps": sums["weight_steps"],
        "arch_steps": sums["arch_steps"],
    }


def weight_step(model: SuperNet, w_opt: torch.optim.Optimizer, batch: Batch, grad_clip: float,
                precision: Precision = FLOAT32) -> Batch:
    """One SGD step on the training loss of ``batch``, the gradient norm clipped to ``grad_clip``
    (of the unscaled gradient, with mixed precision). Returns the loss and the logits (detached)."""
    x, y = batch
    weights = [p for group in w_opt.param_groups for p in group["params"]]
    w_opt.zero_grad(set_to_none=True)
    with precision.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    precision.weights.scale(loss).backward(inputs=weights)
    precision.weights.unscale_(w_opt)
    torch.nn.utils.clip_grad_norm_(weights, grad_clip)
    precision.weights.step(w_opt)      # skipped (and the scale lowered) on non-finite gradients
    precision.weights.update()
    return _widened(loss.detach()), _widened(logits.detach())


# --------------------------------------------------------------------------- the architecture step


def architecture_step(
    model: SuperNet,
    a_opt: torch.optim.Optimizer,
    w_opt: torch.optim.Optimizer,
    train_batch: Batch,
    val_batch: Batch,
    rule: StepRule,
    precision: Precision = FLOAT32,
) -> Batch:
    """Set alpha's gradient (first or second order, negated for anti-search, optionally
    clipped) and take one Adam step. The weights never move here; with ``order=2`` neither do
    the BN running statistics. Returns the validation loss and logits (detached)."""
    alphas = model.arch_parameters()
    a_opt.zero_grad(set_to_none=True)
    if rule.order == 1:
        grads, loss_val, logits_val = first_order_alpha_grad(model, val_batch, precision)
    else:
        if precision.enabled:
            raise ValueError("mixed precision supports the first-order architecture step only")
        group = w_opt.param_groups[0]
        buffers = [w_opt.state.get(p, {}).get("momentum_buffer") for p in model.weights()]
        grads, loss_val, logits_val = unrolled_alpha_grad(
            model, train_batch, val_batch, eta=group["lr"], momentum=group["momentum"],
            weight_decay=group["weight_decay"], momentum_buffers=buffers,
        )
    sign = -1.0 if rule.anti else 1.0
    for alpha, grad in zip(alphas, grads):
        alpha.grad = sign * grad
    precision.alpha.unscale_(a_opt)
    if rule.arch_grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(alphas, rule.arch_grad_clip)
    precision.alpha.step(a_opt)
    precision.alpha.update()
    return loss_val.detach(), logits_val.detach()


def first_order_alpha_grad(model: SuperNet, val_batch: Batch, precision: Precision = FLOAT32
                           ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """d L_val / d alpha at the current weights (times ``precision.alpha``'s scale with mixed
    precision: :func:`architecture_step` unscales). Returns (gradients, loss, logits)."""
    x_val, y_val = val_batch
    with precision.autocast():
        logits = model(x_val)
        loss = F.cross_entropy(logits, y_val)
    grads = torch.autograd.grad(precision.alpha.scale(loss), model.arch_parameters())
    return list(grads), _widened(loss.detach()), _widened(logits.detach())


def _check_finite(loss: torch.Tensor, loss_val: torch.Tensor | None, model: SuperNet, where: str) -> None:
    values = [loss.item(), None if loss_val is None else loss_val.item()]
    finite_alpha = [bool(torch.isfinite(a).all()) for a in model.arch_parameters()]
    if not all(v is None or math.isfinite(v) for v in values) or not all(finite_alpha):
        raise SearchDiverged(
            f"search diverged in {where}: train loss {values[0]}, validation loss {values[1]}, "
            f"alpha finite: {finite_alpha}"
        )
