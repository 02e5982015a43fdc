"""DARTS: differentiable architecture search (Liu et al., 2019), and its anti-search.

Bi-level optimisation as in ``quark0/darts`` ``train_search.py``: for every weight batch,
first an architecture step on a batch of the architecture half (Adam on alpha), then a
weight step on the weight half (SGD with momentum, gradient clipping, cosine schedule).
This module implements the first-order architecture step: the gradient of the validation
loss with respect to alpha at the current weights.

Anti-search (workshop paper, Section 3.3) runs the same search with the architecture
objective negated, so alpha moves towards the operations that *increase* the loss.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .data import BatchLoader, ImageDataset, channel_stats, concatenate
from .genotype import Genotype
from .progress import progress
from .supernet import SuperNet

log = logging.getLogger(__name__)


class SearchDiverged(RuntimeError):
    """The search produced a NaN/inf loss or alpha; the trial must not be retrained."""


@dataclass
class DartsConfig:
    epochs: int = 50
    channels: int = 16
    layers: int = 8
    batch_size: int = 64
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float = 3e-4
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    augment: bool = True
    anti: bool = False


@dataclass
class SearchResult:
    genotype: Genotype
    history: list[dict] = field(default_factory=list)   # one row per epoch
    alphas: dict[str, np.ndarray] = field(default_factory=dict)  # "alpha_normal": epochs x 14 x 8, ...


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
    """
    torch.manual_seed(seed)
    model = SuperNet(
        channels=config.channels,
        num_classes=weight_part.num_classes,
        layers=config.layers,
        in_channels=weight_part.in_channels,
        seed=seed,
    ).to(device)
    weights = list(model.weights())
    w_opt = torch.optim.SGD(weights, config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, config.epochs, eta_min=config.lr_min)
    a_opt = torch.optim.Adam(
        model.arch_parameters(), lr=config.arch_lr, betas=tuple(config.arch_betas), weight_decay=config.arch_weight_decay
    )
    mean, std = normalisation or channel_stats(concatenate(weight_part, arch_part))
    loader = dict(shuffle=True, augment=config.augment, mean=mean, std=std, device=device)
    train_loader = BatchLoader(weight_part, config.batch_size, seed=seed, **loader)
    arch_loader = BatchLoader(arch_part, config.batch_size, seed=seed + 1, **loader)
    sign = -1.0 if config.anti else 1.0

    result = SearchResult(genotype=model.genotype())
    trace = {"alpha_normal": [], "alpha_reduce": []}
    for epoch in progress(range(config.epochs), desc="search epochs"):
        model.train()
        totals = {"train_loss": 0.0, "train_correct": 0, "train_n": 0, "val_loss": 0.0, "val_correct": 0, "val_n": 0}
        arch_batches = iter(arch_loader)
        for x, y in train_loader:
            try:
                x_val, y_val = next(arch_batches)
            except StopIteration:
                arch_batches = iter(arch_loader)
                x_val, y_val = next(arch_batches)

            # architecture step (first order): d L_val / d alpha at the current weights
            a_opt.zero_grad(set_to_none=True)
            logits_val = model(x_val)
            loss_val = F.cross_entropy(logits_val, y_val)
            (sign * loss_val).backward(inputs=model.arch_parameters())
            a_opt.step()

            # weight step on the weight half
            w_opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward(inputs=weights)
            torch.nn.utils.clip_grad_norm_(weights, config.grad_clip)
            w_opt.step()

            _check_finite(loss, loss_val, model, epoch)
            n, n_val = len(y), len(y_val)
            totals["train_loss"] += loss.item() * n
            totals["train_correct"] += (logits.argmax(1) == y).sum().item()
            totals["train_n"] += n
            totals["val_loss"] += loss_val.item() * n_val
            totals["val_correct"] += (logits_val.argmax(1) == y_val).sum().item()
            totals["val_n"] += n_val
        lr = w_opt.param_groups[0]["lr"]   # the rate this epoch trained with
        schedule.step()
        for name, value in model.alphas_numpy().items():
            trace[name].append(value)
        genotype = model.genotype()
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": totals["train_loss"] / totals["train_n"],
            "train_acc": totals["train_correct"] / totals["train_n"],
            "val_loss": totals["val_loss"] / totals["val_n"],
            "val_acc": totals["val_correct"] / totals["val_n"],
            "genotype": genotype.to_dict(),
        }
        result.history.append(row)
        log.info("epoch %d: train acc %.3f, val acc %.3f, %s", epoch + 1, row["train_acc"], row["val_acc"], genotype.summary())
    result.genotype = model.genotype()
    result.alphas = {name: np.stack(values) for name, values in trace.items()}
    return result


def _check_finite(loss: torch.Tensor, loss_val: torch.Tensor, model: SuperNet, epoch: int) -> None:
    values = [loss.item(), loss_val.item()]
    if not all(math.isfinite(v) for v in values) or not all(torch.isfinite(a).all() for a in model.arch_parameters()):
        raise SearchDiverged(
            f"search diverged in epoch {epoch + 1}: train loss {values[0]}, validation loss {values[1]}, "
            "alpha finite: " + str([bool(torch.isfinite(a).all()) for a in model.arch_parameters()])
        )
