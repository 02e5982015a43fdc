"""RoBoT: hybrid NAS by Bayesian optimisation of a weighted sum of training-free metrics.

After He et al. (2024), "Robustifying and Boosting Training-Free Neural Architecture Search"
(reference code ``hzf1174/RoBoT``, ``darts_space/search.py``), the hybrid algorithm the TMLR
audit attacks (Sections 3.2 and 5.2). Written from the reference's behaviour (see
``../shared/REFERENCE.md``, "RoBoT"); not a copy of its code.

1. **Pool.** ``pool_size`` distinct random genotypes of the DARTS space
   (:func:`nbutils.space.genotype.random_genotype`, all seven non-``none`` operations).
   Each is built as an :class:`~nbutils.space.network.EvalNetwork` (``channels`` = 16,
   ``layers`` = 5 cells, no auxiliary head, drop path off, freshly initialised from a seed of
   its own) and scored with the six training-free metrics of :mod:`nbutils.nas.zero_cost` on ONE
   batch of ``metric_batch_size`` = 64 images drawn from the weight half (the reference takes
   the first 64 images of a shuffled training batch). An architecture with any metric
   undefined (:class:`~nbutils.nas.zero_cost.MetricUndefined`, i.e. NaN) is skipped and counted.
2. **Normalisation.** Each metric is min-max normalised over the scored architectures,
   ``(v - min) / (max - min)``.
3. **Bayesian optimisation** (library ``bayesian-optimization``, Gaussian process with a
   Matern 5/2 kernel, upper-confidence-bound acquisition with ``kappa`` = 2.576) over metric
   weights ``w`` in ``[-1, 1]^6``: ``init_points`` random points (1), then ``iterations``
   proposals (24). A query's objective is the validation accuracy of the top-scoring
   architecture, ``argmax_a sum_m w_m * normalised_m(a)``: it is trained briefly on the
   weight half and evaluated on the architecture half (:func:`train_candidate`). An
   architecture is never trained twice: a query whose top architecture was trained already
   gets its cached accuracy. The best weights are those of the query with the highest
   objective (the latest among equals, as the reference's ``>=``).
4. **Exploitation.** Under the best weights, the next-ranked untrained architectures are
   trained, in rank order, until ``budget`` (25) distinct architectures were trained.
5. **Selection.** The trained architecture with the highest validation accuracy (the first
   trained among equals).

Steps 3 to 5, which see the pool only as its normalised metrics, are
:mod:`nbutils.nas.robot_weights`; this module holds the config, the pool and the brief training.

Brief training (the reference's ``train`` of ``search.py``), by the shared loop
(:func:`nbutils.training.loop.train_supervised`): the same network as scored
(C=16, 5 cells, no auxiliary head), SGD with momentum 0.9 and weight decay 3e-4, lr 0.1
cosine-annealed to 5e-3 over 10 epochs, batch 576, gradient norm clipped to 5, drop path
ramped linearly from 0 towards 0.2 over the epochs, no augmentation; the validation accuracy
is that of the whole architecture half in eval mode.

Departures from the reference, deliberate:

* The reference samples genotypes from 7 operation columns, so ``dil_conv_5x5`` (the eighth
  primitive) never occurs; here every operation can be sampled.
* The reference's final selection starts from ``min(val_accs) - 1`` with ``val_accs`` a
  dict keyed by *pool index*, and from architecture 0: unless some accuracy exceeds the
  smallest trained index minus one, it returns pool architecture 0, which in general was
  never trained. Here the result is always the best *trained* architecture.
* Undefined metrics are skipped architectures, counted, never numbers (the reference drops
  NaN terms from the weighted sum of that architecture, after NaN-unaware normalisation).
* A metric that is constant over the pool normalises to 0 (the reference leaves it raw;
  either way it adds the same amount to every score and cannot change a ranking).
* Ranking ties go to the lower pool index (the reference: an unstable ``argsort``).
* Duplicate genotypes are drawn again, so the pool holds ``pool_size`` distinct ones (the
  reference keys its pool by genotype, so duplicates silently shrink it).
* ``synflow`` is the BN-free synflow of the metric's definition; RoBoT's DARTS script calls
  the measure directly and so keeps the BN layers: ``metrics`` with ``"synflow_bn"`` in
  place of ``"synflow"`` reproduces that.
* Inputs are normalised with the given (clean) per-channel statistics, so that poisons
  cannot shift them (the reference: fixed CIFAR constants).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from pydantic import ValidationInfo, field_validator

from ..core.config import (Cells, Channels, NonNegativeInt, NonNegativeNumber, PositiveInt, PositiveNumber, Rate,
                           config, integer, keyed, keyed_when_changed)
from ..core.batches import BatchLoader
from ..core.image_dataset import ImageDataset, channel_stats, concatenate
from ..space.genotype import Genotype, random_genotype
from ..space.network import EvalNetwork
from ..core.progress import progress
from ..training.loop import evaluate, train_supervised
from ..training.recipe import SgdSettings, TrainingRecipe
from .robot_weights import RobotTrace, optimise_weights
from .search_result import SearchResult
from .zero_cost import EXTRA_METRICS, METRICS, compute_metrics

log = logging.getLogger(__name__)

#: What the seeds of the different random choices are derived for (see :func:`child_seed`).
_POOL, _INIT, _TRAIN, _METRIC_BATCH = 0, 1, 2, 3


@config
class RobotConfig(SgdSettings):
    """RoBoT's settings, what search.yaml's ``robot:`` sets; the defaults are the reference's
    (``darts_space/search.py``)."""

    pool_size: PositiveInt = keyed(60000)   # random architectures scored by the metrics
    init_points: PositiveInt = keyed(1)   # random BO queries before the GP proposes
    iterations: NonNegativeInt = keyed(24)   # BO proposals
    budget: PositiveInt = keyed(25)   # distinct architectures trained in all (BO + exploitation)
    train_epochs: PositiveInt = keyed(10)   # brief training of each queried architecture
    train_batch_size: PositiveInt = keyed(576)
    lr: PositiveNumber = keyed(0.1)
    lr_min: NonNegativeNumber = keyed(5e-3)
    momentum: Rate = keyed_when_changed(0.9)
    weight_decay: NonNegativeNumber = keyed_when_changed(3e-4)
    grad_clip: PositiveNumber = keyed_when_changed(5.0)
    drop_path: Rate = keyed_when_changed(0.2)   # final drop-path probability of the linear ramp
    channels: Channels = keyed(16)   # the network scored and trained (the reference uses the same for both)
    layers: Cells = keyed(5)
    metric_batch_size: integer(2) = keyed(64)   # jacob_cov's correlation matrix needs two samples
    metrics: tuple[str, ...] = keyed_when_changed(METRICS)
    kappa: NonNegativeNumber = keyed_when_changed(2.576)   # UCB exploration

    @field_validator("budget")
    @classmethod
    def _budget_fits(cls, budget: int, info: ValidationInfo) -> int:
        queries = (info.data.get("init_points"), info.data.get("iterations"))
        if None not in queries and sum(queries) > budget:
            raise ValueError(f"must be at least init_points + iterations ({queries[0]} + {queries[1]}): every "
                             "query may train a new architecture")
        pool_size = info.data.get("pool_size")
        if pool_size is not None and budget > pool_size:
            raise ValueError(f"must not exceed pool_size ({pool_size}): only pool architectures are trained")
        return budget

    @field_validator("lr_min")
    @classmethod
    def _lr_decreases(cls, lr_min: float, info: ValidationInfo) -> float:
        if info.data.get("lr") is not None and lr_min > info.data["lr"]:
            raise ValueError(f"must not exceed lr ({info.data['lr']}): the schedule anneals lr down to lr_min")
        return lr_min

    @field_validator("metrics", mode="before")
    @classmethod
    def _known_metrics(cls, metrics: object) -> object:
        metrics = (metrics,) if isinstance(metrics, str) else metrics
        allowed = METRICS + EXTRA_METRICS
        if (not isinstance(metrics, (tuple, list)) or not metrics or len(set(metrics)) != len(metrics)
                or any(m not in allowed for m in metrics)):
            raise ValueError(f"must be distinct names from {', '.join(allowed)}")
        return metrics


def child_seed(seed: int, purpose: int, index: int = 0) -> int:
    """An independent 32-bit seed for one random choice (``purpose``, ``index``) of a run."""
    return int(np.random.SeedSequence([int(seed), purpose, index]).generate_state(1)[0])


# --------------------------------------------------------------------------- the pool


def sample_pool(size: int, seed: int) -> list[Genotype]:
    """``size`` distinct random genotypes (each operation, ``dil_conv_5x5`` included, can occur)."""
    rng = np.random.default_rng(child_seed(seed, _POOL))
    pool: list[Genotype] = []
    seen: set[Genotype] = set()
    draws = 0
    while len(pool) < size:
        genotype = random_genotype(rng)
        draws += 1
        if genotype not in seen:
            seen.add(genotype)
            pool.append(genotype)
    if draws > size:
        log.info("pool: %d duplicate genotypes drawn again", draws - size)
    return pool


def score_pool(
    genotypes: Sequence[Genotype],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    channels: int,
    layers: int,
    metrics: Sequence[str] = METRICS,
    seed: int,
    device: torch.device | str,
) -> np.ndarray:
    """The metrics of every genotype's freshly initialised network on one batch, as a
    ``len(genotypes) x len(metrics)`` float64 array; an undefined metric is NaN.

    Network ``i`` is initialised from ``child_seed(seed, init, i)``, so a genotype's values do
    not depend on the rest of the pool."""
    in_channels, input_size = int(images.shape[1]), int(images.shape[-1])
    values = np.full((len(genotypes), len(metrics)), np.nan)
    undefined: dict[str, int] = {}
    for i, genotype in enumerate(progress(genotypes, desc="RoBoT: scoring the pool")):
        torch.manual_seed(child_seed(seed, _INIT, i))
        model = EvalNetwork(genotype, channels=channels, num_classes=num_classes, layers=layers,
                            auxiliary=False, in_channels=in_channels, input_size=input_size)
        result = compute_metrics(model, images, labels, metrics=tuple(metrics), device=device)
        values[i] = [result[name] for name in metrics]
        for name, reason in result.undefined.items():
            undefined[name] = undefined.get(name, 0) + 1
            log.debug("pool architecture %d: %s undefined (%s)", i, name, reason)
    if undefined:
        log.info("pool: undefined metrics %s", undefined)
    return values


def normalise_pool(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min-max normalise each metric (column) over the architectures whose metrics are all
    defined. Returns ``(normalised, defined)``: ``normalised`` has the shape of ``values``,
    NaN on the skipped rows; a column constant over the defined rows becomes 0."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be architectures x metrics, got shape {values.shape}")
    defined = np.isfinite(values).all(axis=1)
    normalised = np.full_like(values, np.nan)
    if defined.any():
        kept = values[defined]
        low, high = kept.min(axis=0), kept.max(axis=0)
        span = high - low
        safe = np.where(span > 0, span, 1.0)
        normalised[defined] = np.where(span > 0, (kept - low) / safe, 0.0)
    return normalised, defined


# --------------------------------------------------------------------------- brief training


def brief_training_recipe(config: RobotConfig) -> TrainingRecipe:
    """The shared loop's recipe for RoBoT's brief training (module docstring). A candidate whose
    loss turns non-finite is still scored (the reference does not check): divergence is logged,
    not raised, so one candidate cannot end the search."""
    return config.recipe(config.train_epochs, drop_path=config.drop_path, divergence="warn")


def train_candidate(
    genotype: Genotype,
    train_set: ImageDataset,
    val_set: ImageDataset,
    config: RobotConfig,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    device: torch.device | str,
) -> dict:
    """Train the genotype's network briefly (RoBoT's recipe, module docstring) on
    ``train_set`` and return its validation accuracy and loss on ``val_set``, its last epoch's
    training loss and accuracy, and the seconds taken."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = EvalNetwork(genotype, channels=config.channels, num_classes=train_set.num_classes, layers=config.layers,
                        auxiliary=False, in_channels=train_set.in_channels, input_size=train_set.image_size).to(device)
    common = dict(mean=mean, std=std, device=device)
    train_loader = BatchLoader(train_set, config.train_batch_size, shuffle=True, seed=seed, **common)
    val_loader = BatchLoader(val_set, config.train_batch_size, shuffle=False, seed=seed, **common)
    run = train_supervised(model, train_loader, brief_training_recipe(config), name="RoBoT candidate", quiet=True)
    last = run.curve[-1]
    train_loss, train_acc = last["train_loss"], last["train_acc"]
    val_acc, val_loss = evaluate(model, val_loader)
    return {"val_acc": float(val_acc), "val_loss": float(val_loss), "train_loss": float(train_loss),
            "train_acc": float(train_acc), "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- the search


def robot_search(
    weight_part: ImageDataset,
    arch_part: ImageDataset,
    config: RobotConfig,
    *,
    seed: int,
    device: torch.device | str,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> SearchResult:
    """Run RoBoT on (possibly poisoned) search data.

    The metric batch and the brief training come from ``weight_part``, validation accuracies
    from ``arch_part``. ``normalisation`` is the per-channel (mean, std) of the inputs (by
    default from the two halves together; pass the clean data's, as
    :func:`nbutils.nas.darts.darts_search` explains).

    Returns a :class:`~nbutils.nas.search_result.SearchResult`: ``genotype`` the best trained architecture;
    ``history`` one row per trained architecture in training order (``trained`` from 1,
    ``kind`` "bo" or "exploit", ``query`` or None, ``pool_index``, ``weights``, ``score``,
    ``genotype``, ``val_acc``, ``val_loss``, ``train_loss``, ``train_acc``, ``seconds``);
    ``stages`` the records of the pool (size, skipped, undefined per metric), of the BO
    queries and of the selection; ``alphas`` arrays for an ``.npz``: ``pool_metrics``
    (pool x metrics, raw, NaN where undefined), ``pool_normalised``, ``pool_defined``,
    ``query_weights``, ``query_pool_index``, ``query_objective``, ``trained_pool_index``,
    ``trained_val_acc``, ``best_weights``.
    """
    mean, std = _checked_search_arguments(weight_part, arch_part, config, seed, normalisation)
    device = torch.device(device)
    names = list(config.metrics)
    # 1-2: the pool, its metrics on one batch of the weight half, normalised
    pool = _scored_pool(weight_part, config, mean=mean, std=std, seed=seed, device=device)
    # 3-5: BO over the weights (a query's objective: a brief training), exploitation, selection
    records: dict[int, dict] = {}
    evaluate_index = _brief_training(pool.genotypes, weight_part, arch_part, config, records, mean=mean, std=std,
                                     seed=seed, device=device)
    trace = optimise_weights(pool.normalised, evaluate_index, init_points=config.init_points,
                             iterations=config.iterations, budget=config.budget, seed=seed, kappa=config.kappa,
                             metric_names=names)
    return _search_result(pool, trace, records, config)


def _checked_search_arguments(weight_part: ImageDataset, arch_part: ImageDataset, config: RobotConfig, seed: int,
                              normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None
                              ) -> tuple[Sequence[float], Sequence[float]]:
    """Set-up (before step 1): the arguments of :func:`robot_search` checked; the normalisation (mean, std)."""
    if not isinstance(config, RobotConfig):
        raise ValueError(f"config must be a RobotConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if weight_part.classes != arch_part.classes or weight_part.shape_chw != arch_part.shape_chw:
        raise ValueError(f"weight_part {weight_part!r} and arch_part {arch_part!r} must share classes and image shape")
    if len(arch_part) == 0:
        raise ValueError("arch_part must hold images (the validation accuracies come from it), got none")
    if len(weight_part) < config.metric_batch_size:
        raise ValueError(
            f"RobotConfig.metric_batch_size ({config.metric_batch_size}) exceeds weight_part, which holds "
            f"{len(weight_part)} images: the metrics need one full batch"
        )
    mean, std = normalisation or channel_stats(concatenate(weight_part, arch_part))
    if len(mean) != weight_part.in_channels or len(std) != weight_part.in_channels:
        raise ValueError(f"normalisation must give one mean and one std per channel ({weight_part.in_channels}), "
                         f"got {normalisation!r}")
    return mean, std


@dataclass
class _ScoredPool:
    """The pool and its metrics (steps 1 and 2)."""

    genotypes: list[Genotype]
    values: np.ndarray          # pool x metrics, raw, NaN where undefined
    normalised: np.ndarray
    defined: np.ndarray
    undefined: dict[str, int]   # per metric, the architectures where it is undefined
    skipped: int
    seconds: float


def _scored_pool(weight_part: ImageDataset, config: RobotConfig, *, mean: Sequence[float], std: Sequence[float],
                 seed: int, device: torch.device) -> _ScoredPool:
    """Steps 1 and 2: the pool, its metrics on one batch of the weight half, normalised."""
    names = list(config.metrics)
    start = time.perf_counter()
    metric_loader = BatchLoader(weight_part, config.metric_batch_size, shuffle=True,
                                seed=child_seed(seed, _METRIC_BATCH), mean=mean, std=std, device=device)
    images, labels = next(iter(metric_loader))
    pool = sample_pool(config.pool_size, seed)
    values = score_pool(pool, images, labels, num_classes=weight_part.num_classes, channels=config.channels,
                        layers=config.layers, metrics=names, seed=seed, device=device)
    normalised, defined = normalise_pool(values)
    undefined = {name: int(np.isnan(values[:, j]).sum()) for j, name in enumerate(names)}
    skipped = int((~defined).sum())
    pool_seconds = time.perf_counter() - start
    log.info("pool: %d architectures scored, %d skipped (undefined metrics: %s), %.1f s",
             len(pool), skipped, undefined, pool_seconds)
    if not defined.any():
        raise RuntimeError(f"RoBoT: every one of the {len(pool)} pool architectures has an undefined metric "
                           f"({undefined}); nothing to search")
    return _ScoredPool(pool, values, normalised, defined, undefined, skipped, pool_seconds)


def _brief_training(pool: list[Genotype], weight_part: ImageDataset, arch_part: ImageDataset, config: RobotConfig,
                    records: dict[int, dict], *, mean: Sequence[float], std: Sequence[float], seed: int,
                    device: torch.device) -> Callable[[int], float]:
    """The objective of steps 3 and 4: pool architecture ``index`` trained briefly, its validation
    accuracy; every training's record goes into ``records``."""
    def evaluate_index(index: int) -> float:
        record = train_candidate(pool[index], weight_part, arch_part, config, mean=mean, std=std,
                                 seed=child_seed(seed, _TRAIN, index), device=device)
        records[index] = record
        log.info("architecture %d: val acc %.4f after %d epochs (%.1f s)", index, record["val_acc"],
                 config.train_epochs, record["seconds"])
        return record["val_acc"]

    return evaluate_index


def _search_result(scored: _ScoredPool, trace: RobotTrace, records: dict[int, dict],
                   config: RobotConfig) -> SearchResult:
    """Step 5's output: the selected architecture, with the records of every step."""
    names = list(config.metrics)
    pool, values, normalised, defined = scored.genotypes, scored.values, scored.normalised, scored.defined
    history = [
        {"trained": k + 1, "kind": row["kind"], "query": row["query"], "pool_index": row["pool_index"],
         "weights": row["weights"], "score": row["score"], "genotype": pool[row["pool_index"]].to_dict(),
         **records[row["pool_index"]]}
        for k, row in enumerate(trace.trained)
    ]
    best = records[trace.best_index]
    best_weights = np.asarray(trace.best_weights, dtype=np.float64)
    stages = [
        {"stage": "pool", "pool_size": len(pool), "scored": int(defined.sum()), "skipped": scored.skipped,
         "undefined": scored.undefined, "metrics": names, "metric_batch_size": config.metric_batch_size,
         "seconds": scored.seconds},
        {"stage": "bayesian_optimisation", "queries": trace.queries},
        {"stage": "selection", "pool_index": trace.best_index, "val_acc": best["val_acc"],
         "best_weights": dict(zip(names, map(float, best_weights))), "trained": len(trace.trained)},
    ]
    log.info("RoBoT: best of %d trained architectures is %d (val acc %.4f): %s", len(trace.trained),
             trace.best_index, best["val_acc"], pool[trace.best_index].summary())
    return SearchResult(
        genotype=pool[trace.best_index],
        history=history,
        arrays={
            "pool_metrics": values,
            "pool_normalised": normalised,
            "pool_defined": defined,
            "query_weights": np.array([[q["weights"][n] for n in names] for q in trace.queries], dtype=np.float64),
            "query_pool_index": np.array([q["pool_index"] for q in trace.queries], dtype=np.int64),
            "query_objective": np.array([q["objective"] for q in trace.queries], dtype=np.float64),
            "trained_pool_index": np.array([row["pool_index"] for row in trace.trained], dtype=np.int64),
            "trained_val_acc": np.array([row["val_acc"] for row in trace.trained], dtype=np.float64),
            "best_weights": best_weights,
        },
        stages=stages,
    )
