"""The supervised training loop: one implementation for every network the project trains.

Retraining a found architecture (:mod:`.train`), CLF's surrogate and the sanitisation
defender's classifier (:mod:`.surrogate`), RoBoT's brief training of candidates
(:mod:`nbutils.nas.robot`) and the one-shot supernet (:mod:`nbutils.nas.one_shot`) all train
with :func:`train_supervised`; each passes its own :class:`~.recipe.TrainingRecipe` and, where its
batches really differ, a ``forward`` hook (the one-shot supernet draws a path per batch).

One epoch ``t`` of ``E`` (counting from 0):

1. ``model.train()``; with ``drop_path > 0`` the drop-path probability is set to
   ``drop_path * t / E`` (a linear ramp from 0, as in DARTS' ``train.py``).
2. For each batch ``(x, y)`` of the loader: cutout (``cutout > 0``, one square per image,
   drawn from ``cutout_generator``); channels_last layout if asked; zero the gradients; the
   forward under autocast; the loss ``CE(logits, y)``, plus ``auxiliary_weight * CE(aux, y)``
   when the network returns auxiliary logits (``(logits, aux)`` with ``aux`` not None);
   backward through the gradient scaler; the divergence check; gradients unscaled and their
   global norm clipped to ``grad_clip``; the SGD step (momentum, weight decay).
3. The cosine schedule steps: ``lr_t = lr_min + (lr - lr_min) * (1 + cos(pi * t / E)) / 2``
   (``torch.optim.lr_scheduler.CosineAnnealingLR``). With ``lr_schedule="step"`` it steps after
   every batch instead, ``t`` counting steps and ``E`` the steps of all epochs, so the last steps
   train at a rate near ``lr_min``. Over DARTS' 600 epochs the two are the same curve; over a
   few epochs the per-epoch one still trains its whole last epoch at a sizeable rate (three
   epochs from 0.05: 0.05, 0.0375, 0.0125), and the weights a short retraining ends with then
   depend on its last batches, so its test accuracy varies between seeds of one cell
   (``benchmarks/README.md``, "the retraining's schedule and size").
4. One row of the curve: ``epoch`` (from 1), ``lr`` used in the epoch (its first step's, per
   step), ``train_loss`` (mean over samples of the batch losses, auxiliary term included) and
   ``train_acc``.

Mixed precision (float16 autocast and gradient scaling) applies on CUDA only; elsewhere the
scaler and autocast are pass-throughs, so the arithmetic is plain float32. channels_last
converts the model's parameters and every input batch to NHWC: the same arithmetic in another
memory layout. The loop takes any ``nn.Module`` whose forward gives logits or
``(logits, aux)``: a network built for speed (e.g. NHWC throughout) slots in where the caller
builds its model, with no change here.

Divergence: a non-finite batch loss raises RuntimeError naming the epoch (``divergence =
"raise"``), before the step, so its gradients never touch the weights; ``"warn"`` logs the first one and trains on,
for searches that must score a candidate whatever happens to it (RoBoT).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.device import MixedPrecision
from ..core.progress import progress
from .recipe import TrainingRecipe

log = logging.getLogger(__name__)

Output = Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]
"""What a forward gives: logits, or ``(logits, aux)`` with ``aux`` the auxiliary head's logits or None."""


@dataclass
class TrainingRun:
    """What :func:`train_supervised` did: ``curve`` one row per epoch (``epoch``, ``lr``,
    ``train_loss``, ``train_acc``); ``mixed_precision`` whether float16 autocast was really used."""

    curve: list[dict]
    mixed_precision: bool


def cutout(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one square per image, rows ``[cy - length//2, cy + length//2)`` (likewise columns)
    around a uniformly drawn centre, clipped at the border: DARTS' ``Cutout``, applied as
    there to the normalised image."""
    n, _, h, w = x.shape
    cy = torch.randint(h, (n, 1, 1), generator=generator).to(x.device)
    cx = torch.randint(w, (n, 1, 1), generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    half = length // 2
    inside = (rows >= cy - half) & (rows < cy + half) & (cols >= cx - half) & (cols < cx + half)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of a network (eval mode, no gradients) on every sample of ``loader``."""
    model.eval()
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else out
            correct += (logits.argmax(1) == y).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            n += len(y)
    return correct / n, loss / n


def batch_loss(output: Output, y: torch.Tensor, auxiliary_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logits)`` of one batch: the cross-entropy of the logits, plus ``auxiliary_weight``
    times that of the auxiliary logits when the network gave any."""
    logits, aux = output if isinstance(output, tuple) else (output, None)
    loss = F.cross_entropy(logits, y)
    if aux is not None:
        loss = loss + auxiliary_weight * F.cross_entropy(aux, y)
    return loss, logits


def train_supervised(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    recipe: TrainingRecipe,
    *,
    parameters: Iterable[nn.Parameter] | None = None,
    forward: Callable[[torch.Tensor], Output] | None = None,
    cutout_generator: torch.Generator | None = None,
    name: str = "training",
    quiet: bool = False,
) -> TrainingRun:
    """Train ``model`` in place on ``loader`` (iterated once per epoch) as the module docstring says.

    ``parameters``: what SGD updates and clipping measures (default: all of the model's).
    ``forward``: how one input batch goes through the model (default ``model(x)``); called once
    per batch, after the gradients are zeroed. ``cutout_generator``: the generator cutout draws
    its squares from (needed when ``recipe.cutout > 0``). ``name``: the training's name in the
    progress bar, the log and the divergence error. ``quiet``: no progress bar and per-epoch lines
    at debug level, for many brief trainings inside a search that shows its own progress.
    """
    if recipe.cutout > 0 and cutout_generator is None:
        raise ValueError("recipe.cutout > 0 needs a cutout_generator (the squares' random centres)")
    if recipe.drop_path > 0 and not hasattr(model, "drop_path_prob"):
        raise ValueError(f"recipe.drop_path > 0 needs a model with drop_path_prob, got {type(model).__name__}")
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    parameters = list(model.parameters() if parameters is None else parameters)
    if not parameters:
        raise ValueError("there are no parameters to train")
    precision = MixedPrecision.for_device(recipe.mixed_precision, parameters[0].device, name)
    steps = _Steps(recipe, parameters, precision, model if forward is None else forward, cutout_generator, name)
    schedule, per_step = _cosine_schedule(steps.optimiser, recipe, loader, name)
    level = logging.DEBUG if quiet else logging.INFO
    epochs = range(recipe.epochs) if quiet else progress(range(recipe.epochs), desc=f"{name} epochs")
    curve: list[dict] = []
    for epoch in epochs:
        model.train()
        if recipe.drop_path > 0:
            model.drop_path_prob = recipe.drop_path * epoch / recipe.epochs
        lr = steps.optimiser.param_groups[0]["lr"]
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            value, logits = steps.step(x, y, epoch)
            if per_step:
                schedule.step()
            loss_sum += value * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        if seen == 0:
            raise ValueError(f"{name}: the loader yielded no samples in epoch {epoch + 1}")
        if not per_step:
            schedule.step()
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen}
        curve.append(row)
        log.log(level, "%s epoch %d: loss %.3f, acc %.3f, lr %.4g", name, epoch + 1, row["train_loss"],
                row["train_acc"], lr)
    return TrainingRun(curve=curve, mixed_precision=precision.enabled)


def _cosine_schedule(optimiser: torch.optim.Optimizer, recipe: TrainingRecipe, loader: Iterable, name: str
                     ) -> tuple[torch.optim.lr_scheduler.CosineAnnealingLR, bool]:
    """Step 3 of the module docstring: the schedule, and whether it steps after every batch
    (``recipe.lr_schedule == "step"``, over all epochs' batches) rather than after every epoch."""
    per_step = recipe.lr_schedule == "step"
    if per_step and not hasattr(loader, "__len__"):
        raise ValueError(f"{name}: lr_schedule 'step' needs a loader with a length (its steps per epoch)")
    horizon = max(recipe.epochs * (len(loader) if per_step else 1), 1)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, horizon, eta_min=recipe.lr_min), per_step


class _Steps:
    """Step 2 of the module docstring for one batch: the SGD optimiser, the gradient scaler, and
    the divergence rule (``"warn"`` logs the first non-finite loss only)."""

    def __init__(self, recipe: TrainingRecipe, parameters: list[nn.Parameter], precision: MixedPrecision,
                 forward: Callable[[torch.Tensor], Output], cutout_generator: torch.Generator | None, name: str):
        self.recipe, self.parameters, self.precision, self.forward = recipe, parameters, precision, forward
        self.cutout_generator, self.name, self.warned = cutout_generator, name, False
        self.scaler = precision.scaler()
        self.optimiser = torch.optim.SGD(parameters, recipe.lr, momentum=recipe.momentum,
                                         weight_decay=recipe.weight_decay)

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[float, torch.Tensor]:
        """One SGD step on the batch ``(x, y)``; its loss (a float) and logits."""
        recipe = self.recipe
        if recipe.cutout > 0:
            x = cutout(x, recipe.cutout, self.cutout_generator)
        if recipe.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.optimiser.zero_grad(set_to_none=True)
        with self.precision.autocast():
            loss, logits = batch_loss(self.forward(x), y, recipe.auxiliary_weight)
        self.scaler.scale(loss).backward()
        value = loss.item()   # the batch's one wait for the device, after the backward is queued
        if not math.isfinite(value):
            self._diverged(value, epoch)
        if recipe.grad_clip is not None:
            self.scaler.unscale_(self.optimiser)   # clip the true gradients
            torch.nn.utils.clip_grad_norm_(self.parameters, recipe.grad_clip)
        self.scaler.step(self.optimiser)
        self.scaler.update()
        return value, logits

    def _diverged(self, value: float, epoch: int) -> None:
        if self.recipe.divergence == "raise":
            raise RuntimeError(f"{self.name} diverged in epoch {epoch + 1}: loss {value}")
        if not self.warned:
            log.warning("%s diverged in epoch %d: loss %s; training goes on (divergence='warn')",
                        self.name, epoch + 1, value)
            self.warned = True
