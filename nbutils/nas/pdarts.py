"""P-DARTS: progressive differentiable architecture search (Chen et al., 2019).

As in ``chenxin061/pdarts`` ``train_search.py``. The search runs in stages of growing depth
(5, 11, 17 cells). Each stage builds a *new* supernet, fresh weights and alpha, over the
operations still switched on, and trains it like DARTS (:func:`nbutils.nas.darts.train_epoch`,
first order, alpha's gradient clipped too) after a warm-up of weight-only epochs. At the end
of a stage the weakest operations of every edge are switched off (8 -> 5 -> 3 -> 1 per
edge); only these switches pass to the next stage.

Two regularisers work against skip connections: dropout after every identity skip, decayed
within a stage (:func:`skip_dropout_rate`), and a final normal cell with at most
``max_skip`` skip connections (:func:`final_cell`).

The final genotype comes from the last stage's probabilities: ``none`` zeroed, each node
keeps the two incoming edges with the largest probability, and each kept edge the one
operation that survives the last switch-off. Ties follow the reference: when dropping, the
lower index goes first (``np.argmin``); when keeping edges, the later edge wins (a stable
ascending sort, the last two kept). Gene pairs are listed by source, as the reference's
``parse_network`` does.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationInfo, field_validator

from ..core.config import (Cells, Channels, NonNegativeInt, NonNegativeNumber, Order, PositiveInt, PositiveNumber, Rate,
                           config, keyed, set_by_run)
from .darts import Precision, StepRule, first_order_only, make_optimisers, search_loaders, train_epoch
from ..accel.supernet_choice import supernet_class
from ..core.batches import BatchLoader
from ..core.image_dataset import ImageDataset
from ..core.device import MixedPrecision
from ..space.genotype import NUM_EDGES, STEPS, Gene, Genotype, iter_edges
from ..space.ops import PRIMITIVES
from ..space.supernet import SuperNet
from ..core.progress import progress
from ..training.recipe import SgdSettings
from .search_result import SearchResult

log = logging.getLogger(__name__)

Switches = list[tuple[str, ...]]   # per edge, the operations still on, in PRIMITIVES order
CELLS = ("normal", "reduce")
SKIP = "skip_connect"


@config
class PdartsConfig(SgdSettings):
    """P-DARTS' settings; the defaults are the reference's, except the skip dropout rates: its code
    defaults to 0.0, its README runs ``--dropout_rate 0.1 0.4 0.7``, used here. The weights' SGD
    settings (:class:`~nbutils.training.recipe.SgdSettings`; ``grad_clip`` clips alpha's gradient
    too) and the fields up to ``order`` are what search.yaml's ``pdarts:`` sets; the run sets the
    rest for each search."""

    layers: tuple[Cells, ...] = keyed((5, 11, 17))   # cells per stage (base 5, add_layers 0, 6, 12)
    num_to_keep: tuple[PositiveInt, ...] = keyed((5, 3, 1))   # operations per edge after each stage (drop 3, 2, 2)
    dropout_rates: tuple[Rate, ...] = keyed((0.1, 0.4, 0.7))   # skip dropout per stage
    epochs: PositiveInt = keyed(25)   # per stage
    warmup_epochs: NonNegativeInt = keyed(10)   # per stage, weights only
    channels: Channels = keyed(16)
    batch_size: PositiveInt = keyed(96)
    arch_lr: PositiveNumber = keyed(6e-4)
    arch_betas: tuple[Rate, Rate] = keyed((0.5, 0.999))
    arch_weight_decay: NonNegativeNumber = keyed(1e-3)
    max_skip: NonNegativeInt | None = keyed(2)   # skip connections in the final normal cell; None: no limit
    order: Order = keyed(1)
    # set by the run
    augment: bool = set_by_run(True)
    anti: bool = set_by_run(False)
    fast: bool = set_by_run(True)   # the fast supernet (same function as the plain one), CPU only
    mixed_precision: bool = set_by_run(False)   # CUDA only: float16 autocast with gradient scaling (order 1)

    @field_validator("layers")
    @classmethod
    def _at_least_one_stage(cls, layers: tuple[int, ...]) -> tuple[int, ...]:
        if not layers:
            raise ValueError("needs at least one stage")
        return layers

    @field_validator("num_to_keep")
    @classmethod
    def _keep_fewer_each_stage(cls, num_to_keep: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        _one_per_stage(num_to_keep, info)
        kept = (len(PRIMITIVES), *num_to_keep)
        if not num_to_keep or any(later >= earlier for earlier, later in zip(kept, kept[1:])) or kept[-1] != 1:
            raise ValueError(f"must decrease from the {len(PRIMITIVES)} operations to 1 (the last stage keeps one "
                             "operation per edge)")
        return num_to_keep

    @field_validator("dropout_rates")
    @classmethod
    def _dropout_per_stage(cls, dropout_rates: tuple[float, ...], info: ValidationInfo) -> tuple[float, ...]:
        return _one_per_stage(dropout_rates, info)

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_within_stage(cls, warmup_epochs: int, info: ValidationInfo) -> int:
        epochs = info.data.get("epochs")
        if epochs is not None and warmup_epochs > epochs:
            raise ValueError(f"cannot exceed epochs ({epochs})")
        return warmup_epochs

    @field_validator("mixed_precision")
    @classmethod
    def _first_order_only(cls, mixed_precision: bool, info: ValidationInfo) -> bool:
        return first_order_only(mixed_precision, info)


def _one_per_stage(values: tuple, info: ValidationInfo) -> tuple:
    layers = info.data.get("layers")
    if layers is not None and len(values) != len(layers):
        raise ValueError(f"needs one entry per stage: {len(layers)}, as layers has")
    return values


def pdarts_search(
    weight_part: ImageDataset,
    arch_part: ImageDataset,
    config: PdartsConfig,
    *,
    seed: int,
    device: torch.device,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> SearchResult:
    """Search on (possibly poisoned) data. Returns the genotype, one history row per epoch
    (numbered across stages), alpha per stage (``alpha_normal_stage1``: epochs x 14 x ops, ...)
    and one record per stage in ``stages`` (switches searched and kept, probabilities,
    parameter count; the last also the genotype before the skip limit).

    ``normalisation`` as in :func:`nbutils.nas.darts.darts_search`.
    """
    torch.manual_seed(seed)
    loaders = search_loaders(
        weight_part, arch_part, config.batch_size, augment=config.augment, seed=seed, device=device,
        normalisation=normalisation,
    )
    switches: dict[str, Switches] = {cell: [PRIMITIVES] * NUM_EDGES for cell in CELLS}
    history: list[dict] = []
    alphas: dict[str, np.ndarray] = {}
    records: list[dict] = []
    stages = len(config.layers)
    supernet = supernet_class(config.fast, device)   # one choice (and note) for every stage
    for stage, (cells, keep, rate) in enumerate(zip(config.layers, config.num_to_keep, config.dropout_rates), 1):
        # a new network each stage: only the switches carry over
        model = _stage_supernet(supernet, config, weight_part, switches, cells, rate, device)
        alphas.update(_train_stage(model, config, loaders, switches, history, stage=stage, stages=stages,
                                   cells=cells, rate=rate, device=device))
        last = stage == stages
        probs, kept, record = _switch_off_stage(model, switches, keep, config, stage=stage, cells=cells, rate=rate,
                                                last=last)
        records.append(record)
        if last:
            final = _final_genotype(probs, switches, record, config.max_skip)
        switches = kept
        log.info("stage %d done: %d operations per edge left", stage, keep)
    # the last stage's converged supernet: the target of NAS-specific gradient canceling
    return SearchResult(genotype=final, history=history, arrays=alphas, stages=records,
                        supernets={len(history): model.checkpoint()})


# --------------------------------------------------------------------------- the steps of a stage


def _stage_supernet(supernet: type[SuperNet], config: PdartsConfig, weight_part: ImageDataset,
                    switches: dict[str, Switches], cells: int, rate: float, device: torch.device) -> SuperNet:
    """Stage step 1: a new ``supernet`` of ``cells`` cells over the operations still switched on."""
    return supernet(
        channels=config.channels,
        num_classes=weight_part.num_classes,
        layers=cells,
        in_channels=weight_part.in_channels,
        switches_normal=switches["normal"],
        switches_reduce=switches["reduce"],
        skip_dropout=rate,
    ).to(device)


def _train_stage(
    model: SuperNet,
    config: PdartsConfig,
    loaders: tuple[BatchLoader, BatchLoader],
    switches: dict[str, Switches],
    history: list[dict],
    *,
    stage: int,
    stages: int,
    cells: int,
    rate: float,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Stage step 2: train it as DARTS does, weights only in the warm-up, skip dropout decaying.

    Appends one row per epoch to ``history``; returns alpha per epoch (``alpha_normal_stage{stage}``, ...)."""
    train_loader, arch_loader = loaders
    w_opt, schedule, a_opt = make_optimisers(model, config)
    precision = Precision(MixedPrecision.for_device(config.mixed_precision, device, "searching"))
    trace = {"alpha_normal": [], "alpha_reduce": []}
    for epoch in progress(range(config.epochs), desc=f"P-DARTS stage {stage}/{stages}"):
        p = skip_dropout_rate(rate, epoch, config.epochs, config.warmup_epochs)
        model.set_skip_dropout(p)
        rule = StepRule(arch_step=epoch >= config.warmup_epochs, order=config.order, anti=config.anti,
                        grad_clip=config.grad_clip, arch_grad_clip=config.grad_clip)
        lr = w_opt.param_groups[0]["lr"]
        stats = train_epoch(model, w_opt, a_opt, train_loader, arch_loader, rule,
                            where=f"stage {stage}, epoch {epoch + 1}", precision=precision)
        schedule.step()
        for name, value in model.alphas_numpy().items():
            trace[name].append(value)
        genotype = model.genotype()
        history.append({
            "epoch": len(history) + 1, "stage": stage, "stage_epoch": epoch + 1, "cells": cells,
            "ops_per_edge": len(switches["normal"][0]), "skip_dropout": p, "arch_step": rule.arch_step,
            "lr": lr, **stats, "genotype": genotype.to_dict(), "summary": genotype.summary(),
        })
        log.info("stage %d epoch %d: train acc %.3f, %s", stage, epoch + 1, stats["train_acc"], genotype.summary())
    return {f"{name}_stage{stage}": np.stack(values) for name, values in trace.items()}


def _switch_off_stage(
    model: SuperNet,
    switches: dict[str, Switches],
    keep: int,
    config: PdartsConfig,
    *,
    stage: int,
    cells: int,
    rate: float,
    last: bool,
) -> tuple[dict[str, np.ndarray], dict[str, Switches], dict]:
    """Stage step 3: switch off the weakest operations of every edge (``none`` first after the last stage).

    Returns the stage's probabilities per cell, the switches kept and the stage's record."""
    probs = {cell: F.softmax(alpha.detach().cpu().double(), dim=-1).numpy()
             for cell, alpha in zip(CELLS, model.arch_parameters())}
    kept = {cell: switch_off(probs[cell], switches[cell], keep, none_first=last) for cell in CELLS}
    record = {
        "stage": stage, "cells": cells, "epochs": config.epochs, "skip_dropout": rate,
        "parameters": sum(w.numel() for w in model.weights()),
        **{f"switches_{cell}": [list(ops) for ops in switches[cell]] for cell in CELLS},
        **{f"probs_{cell}": probs[cell].tolist() for cell in CELLS},
        **{f"kept_{cell}": [list(ops) for ops in kept[cell]] for cell in CELLS},
    }
    return probs, kept, record


def _final_genotype(probs: dict[str, np.ndarray], switches: dict[str, Switches], record: dict,
                    max_skip: int | None) -> Genotype:
    """Final step: the genotype from the last stage, with the skip limit; both versions go into ``record``."""
    final = pdarts_genotype(probs, switches, max_skip=max_skip)
    record["genotype_before_skip_limit"] = pdarts_genotype(probs, switches, max_skip=None).to_dict()
    record["genotype"] = final.to_dict()
    return final


# --------------------------------------------------------------------------- within a stage


def skip_dropout_rate(rate: float, epoch: int, epochs: int, warmup_epochs: int, decay: float = 0.2) -> float:
    """Dropout after identity skips in ``epoch`` (0-based) of a stage whose rate is ``rate``:
    ``rate * (epochs - epoch - 1) / epochs`` during the warm-up, then
    ``rate * exp(-(epoch - warmup_epochs) * decay)``."""
    if epoch < warmup_epochs:
        return rate * (epochs - epoch - 1) / epochs
    return rate * math.exp(-(epoch - warmup_epochs) * decay)


# --------------------------------------------------------------------------- between stages


def switch_off(probs: np.ndarray, switches: Switches, keep: int, *, none_first: bool) -> Switches:
    """The operations each edge keeps: the ``keep`` most probable of those on. ``probs`` holds,
    per edge, the softmax over the operations on (in ``switches`` order). With ``none_first``
    (the last stage) ``none`` goes first, counting as one of those dropped."""
    return [_keep_strongest(row, ops, keep, none_first) for row, ops in zip(np.asarray(probs), switches, strict=True)]


def _keep_strongest(row: np.ndarray, ops: Sequence[str], keep: int, none_first: bool) -> tuple[str, ...]:
    if len(row) != len(ops) or not 1 <= keep <= len(ops):
        raise ValueError(f"cannot keep {keep} of {len(ops)} operations {tuple(ops)} with {len(row)} probabilities")
    dropped: list[int] = []
    if none_first and "none" in ops and keep < len(ops):
        dropped.append(list(ops).index("none"))
    while len(ops) - len(dropped) > keep:
        candidates = [k for k in range(len(ops)) if k not in dropped]
        dropped.append(min(candidates, key=lambda k: (row[k], k)))   # lowest; ties: the lower index
    return tuple(op for k, op in enumerate(ops) if k not in dropped)


# --------------------------------------------------------------------------- the final genotype


def pdarts_genotype(probs: dict[str, np.ndarray], switches: dict[str, Switches], max_skip: int | None = 2) -> Genotype:
    """The genotype from the last stage: ``probs[cell]`` its softmax over the operations on,
    ``switches[cell]`` those operations; the skip limit applies to the normal cell only."""
    return Genotype(
        normal=final_cell(probs["normal"], switches["normal"], max_skip),
        reduce=final_cell(probs["reduce"], switches["reduce"], None),
    )


def final_cell(probs: np.ndarray, switches: Switches, max_skip: int | None = None) -> Gene:
    """One cell of the final genotype, with at most ``max_skip`` skip connections.

    ``none`` is zeroed; each edge keeps its one strongest other operation, each node its two
    edges with the largest probability. While more than ``max_skip`` kept edges are skips, the
    weakest of those skips gets probability 0 (zeros accumulate), and the operations and edges
    are chosen again: that edge switches to its next best operation, or loses its place.
    """
    probs = np.array(probs, dtype=np.float64)
    if probs.shape != (NUM_EDGES, len(switches[0])):
        raise ValueError(f"probs must have shape {(NUM_EDGES, len(switches[0]))}, got {probs.shape}")
    for e, ops in enumerate(switches):
        if "none" in ops:
            probs[e, ops.index("none")] = 0.0

    def choose() -> tuple[list[str], list[int]]:
        ops = [_keep_strongest(row, edge_ops, 1, none_first=True)[0] for row, edge_ops in zip(probs, switches)]
        return ops, _keep_two_edges(probs.max(axis=1))

    ops, edges = choose()
    while max_skip is not None:
        skips = [e for e in edges if ops[e] == SKIP]
        if len(skips) <= max_skip:
            break
        removable = [e for e in skips if probs[e, switches[e].index(SKIP)] > 0]
        if not removable:   # only possible with probabilities of exactly 0; the reference would loop forever
            log.warning("skip limit %d not reached: %d skips left that cannot be removed", max_skip, len(skips))
            break
        weakest = min(removable, key=lambda e: (probs[e, switches[e].index(SKIP)], e))
        probs[weakest, switches[weakest].index(SKIP)] = 0.0
        ops, edges = choose()
    sources = [src for _, src in iter_edges()]
    return tuple((ops[e], sources[e]) for e in sorted(edges))


def _keep_two_edges(strength: np.ndarray) -> list[int]:
    """Per node, the two incoming edges of largest strength (ties: the later edge)."""
    kept, start = [], 0
    for node in range(STEPS):
        n = 2 + node
        ranked = sorted(range(n), key=lambda j: strength[start + j])   # stable, ascending
        kept += [start + j for j in ranked[-2:]]
        start += n
    return kept

