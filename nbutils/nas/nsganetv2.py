"""NSGANetV2 on the DARTS space: surrogate-assisted NSGA-II over error and model cost.

After Lu et al. (2020), "NSGANetV2: Evolutionary Multi-Objective Surrogate-Assisted Neural
Architecture Search" (reference code ``mikelzc1990/nsganetv2``: ``msunas.py``,
``post_search.py``), as the TMLR audit runs it (Appendix A). Two objectives are minimised:
the validation error of an architecture and its cost, the parameters (or multiply-accumulates)
of the network that would be retrained (:class:`~nbutils.nas.architecture_cost.ArchitectureCost`).

1. **Lower level, a weight-sharing supernet** (:mod:`nbutils.nas.one_shot`) trained on the
   weight half of the (possibly poisoned) search data by uniform single-path sampling. An
   architecture's "measured" error is that of its path with inherited weights, batch norm
   recalibrated on a few training batches, on the architecture half. (The reference inherits
   from a once-for-all supernet pretrained on ImageNet; that cannot be had offline.)
   With ``finetune_epochs > 0`` each candidate is first fine-tuned, as the reference does
   (``evaluator.py``, ``OFAEvaluator.eval``: 5 epochs on CIFAR-10 in the audit's runs), on a
   copy of its path's weights (:class:`FinetunedPathEvaluator`); the supernet is never changed.
2. **Design of experiments**: ``initial_design`` architectures, the cheapest one (pools
   only) and the most expensive one (``sep_conv_5x5`` everywhere), as the reference starts
   from the smallest and largest networks, and the rest drawn uniformly
   (:mod:`nbutils.space.encoding`), all measured.
3. **Each iteration**: fit the accuracy predictor on the archive of measured architectures
   (:mod:`nbutils.nas.accuracy_predictors`: RBF, GP, CART or the adaptive choice by
   cross-validated Kendall tau); run NSGA-II (pymoo) on (predicted error, cost), its first
   population the archive's current non-dominated set, with the reference's operators
   (two-point crossover with probability 0.9, polynomial mutation with eta 1 rounded to
   integers, duplicates eliminated, population 40, 20 generations); of its final population
   keep the architectures not measured yet and take ``candidates_per_iteration`` of them.
   ``candidate_selection="rank"`` (the default): by predicted non-domination rank, and within
   the rank that does not fit whole, those that spread the cost along the archive's front most
   evenly, chosen greedily (:func:`~nbutils.nas.pareto.select_candidates`). ``"spread"``: the reference's subset
   selection (``msunas.py``, ``MSuNAS._subset_selection`` and ``SubsetProblem``), which ignores
   the predicted error and takes, out of the whole new population, the subset of exactly that
   size whose costs, with the costs of the archive's front, leave the most even gaps (least
   standard deviation of the gaps between the sorted costs) (:func:`~nbutils.nas.pareto.select_by_spread`).
   Measure them, add them to the archive.
4. **Output**: the archive's Pareto front (measured error vs cost) and the architecture the
   papers retrain. The audit "samples the four best architectures from each search run's
   Pareto front ... [and evaluates] only the architecture with the third-highest FLOP count".
   Its scripts call the reference's ``post_search.py -n 3``: the three points of the front
   with the highest trade-off (:func:`~nbutils.nas.pareto.high_tradeoff_points`) plus the most accurate one.
   Those are the "four best" here too (fewer when the most accurate is also a trade-off
   point, or the front is short), and the chosen one is the third by decreasing cost (the
   cheapest of them when there are fewer than three). The cost is the second objective, so
   with ``cost="macs"`` (the reference's ``--sec_obj flops``, which counts multiply-accumulates
   with ``torchprofile.profile_macs``) the chosen one is the "third-highest FLOP count".
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import ValidationInfo, field_validator

from ..core.config import (Cells, Channels, NonNegativeInt, NonNegativeNumber, PositiveInt, PositiveNumber, Rate,
                           config, integer, keyed, keyed_when_changed, number, set_by_run)
from ..space import encoding
from .accuracy_predictors import CHOICES, MIN_POINTS, FittedPredictor, fit_predictor, kendall_tau
from ..core.batches import BatchLoader
from ..core.image_dataset import ImageDataset, channel_stats, concatenate
from ..space.genotype import Genotype
from .one_shot import (OneShotSupernet, PathEvaluator, calibration_batches, recalibrate_batch_norm,
                       train_one_shot)
from .architecture_cost import COSTS, ArchitectureCost
from .pareto import SELECTIONS, choose_retrained, non_dominated, propose_candidates
from .search_result import SearchResult
from ..core.progress import progress
from ..training.loop import train_supervised
from ..training.recipe import SgdSettings, TrainingRecipe

log = logging.getLogger(__name__)

#: SGD momentum of the candidates' fine-tuning: the reference's (OFA ``RunConfig.build_optimizer``)
FINETUNE_MOMENTUM = 0.9


# --------------------------------------------------------------------------- configuration


@config
class Nsganetv2Config(SgdSettings):
    """Search settings; the defaults are the reference's where it has one. Every field but
    ``augment`` is what search.yaml's ``nsganetv2:`` sets; the run sets ``augment`` for each search."""

    # the evolutionary search (reference: 100 initial, 30 iterations of 8, NSGA-II 40 x 20)
    iterations: NonNegativeInt = keyed(30)
    initial_design: PositiveInt = keyed(100)
    candidates_per_iteration: PositiveInt = keyed(8)
    predictor: Literal[CHOICES] = keyed("adaptive")   # rbf, gp, cart, or adaptive (best cross-validated Kendall tau)
    cv_folds: integer(2) = keyed_when_changed(10)
    cart_trees: PositiveInt = keyed_when_changed(100)
    population: integer(2) = keyed(40)
    generations: PositiveInt = keyed(20)
    crossover_prob: number(ge=0, le=1) = keyed_when_changed(0.9)
    mutation_eta: PositiveNumber = keyed_when_changed(1.0)
    # "rank": non-domination ranks first, then even cost gaps; "spread": the reference's subset selection
    candidate_selection: Literal[SELECTIONS] = keyed_when_changed("rank")
    # the second objective: the retrained network's parameters or multiply-accumulates
    cost: Literal[COSTS] = keyed("params")
    cost_channels: Channels = keyed(36)
    cost_layers: Cells = keyed(20)
    cost_input_size: integer(2) | None = keyed_when_changed(None)   # for "macs"; None: the search images' size
    # the weight-sharing supernet (DARTS search network sizes and weight recipe)
    channels: Channels = keyed(16)
    layers: Cells = keyed(8)
    epochs: NonNegativeInt = keyed(50)
    batch_size: integer(2) = keyed(64)
    lr_min: NonNegativeNumber = keyed_when_changed(0.001)
    momentum: Rate = keyed_when_changed(0.9)
    weight_decay: NonNegativeNumber = keyed_when_changed(3e-4)
    grad_clip: PositiveNumber = keyed_when_changed(5.0)
    calibration_batches: PositiveInt = keyed(10)   # batch-norm recalibration per candidate
    eval_batch_size: PositiveInt = keyed_when_changed(256)
    # fine-tuning of each candidate before it is measured (0: none, the one-shot weights as they
    # are); the rest is the reference's recipe: SGD (momentum 0.9), cosine to 0, no clipping
    finetune_epochs: NonNegativeInt = keyed_when_changed(0)
    finetune_lr: PositiveNumber = keyed_when_changed(0.01)
    finetune_weight_decay: NonNegativeNumber = keyed_when_changed(4e-5)
    finetune_batch_size: PositiveInt = keyed_when_changed(128)
    # which front member is retrained: the third by cost of the `tradeoff_points` + most accurate
    tradeoff_points: PositiveInt = keyed_when_changed(3)
    # set by the run
    augment: bool = set_by_run(True)

    @field_validator("initial_design")
    @classmethod
    def _enough_to_fit_a_predictor(cls, initial_design: int, info: ValidationInfo) -> int:
        if info.data.get("iterations", 0) > 0 and initial_design < MIN_POINTS:
            raise ValueError(f"must be >= {MIN_POINTS} when iterations > 0: the predictors are fitted (and "
                             f"cross-validated) on the measured architectures")
        return initial_design

    def training(self) -> TrainingRecipe:
        """The recipe the weight-sharing supernet is trained with (:func:`~.one_shot.train_one_shot`)."""
        return self.recipe(self.epochs)

    def finetuning(self) -> TrainingRecipe:
        """The recipe each candidate is fine-tuned with (see :class:`FinetunedPathEvaluator`)."""
        return TrainingRecipe(epochs=self.finetune_epochs, lr=self.finetune_lr, lr_min=0.0,
                              momentum=FINETUNE_MOMENTUM, weight_decay=self.finetune_weight_decay, grad_clip=None,
                              divergence="warn")


# --------------------------------------------------------------------------- fine-tuned measurement


class FinetunedPathEvaluator:
    """Validation accuracy of architectures whose inherited weights are fine-tuned first.

    The reference measures each candidate after a few epochs of training of its sub-network
    on the search data's training part (``evaluator.py``, ``OFAEvaluator.eval`` with
    ``n_epochs`` 5 in the audit's runs; the recipe is its ``CIFARRunConfig`` and the
    once-for-all ``RunManager``). For each genotype, on a copy of the supernet (the supernet
    itself is never changed, so every candidate starts from the same weights):

    1. batch norm recalibrated on ``calibration`` (the reference resets the running statistics
       before training);
    2. the path's parameters trained with :func:`~nbutils.training.loop.train_supervised` and
       ``recipe`` on the batches of a fresh ``training()`` loader (the same batches for every
       candidate, whatever was measured before);
    3. the accuracy on ``validation`` in evaluation mode, with the running statistics the
       training left, as the reference validates after training.

    The reference's recipe is SGD with momentum 0.9 (Nesterov), learning rate 0.01 cosine-annealed
    to 0 per batch, weight decay 4e-5, batch 128, no gradient clipping, plain cross-entropy. The
    shared loop has no Nesterov momentum and anneals per epoch; those two details differ. The
    reference also replaces the classifier by a fresh one with dropout 0.2, because its
    supernet was trained on ImageNet's 1000 classes; ours is trained on the search data's own
    classes, so its classifier is kept.
    """

    def __init__(self, supernet: OneShotSupernet, calibration: Sequence[torch.Tensor],
                 training: Callable[[], BatchLoader], validation: BatchLoader, recipe: TrainingRecipe):
        if not calibration:
            raise ValueError("calibration must hold at least one batch, got none")
        if recipe.epochs < 1:
            raise ValueError(f"recipe.epochs must be >= 1 to fine-tune, got {recipe.epochs}")
        self.supernet = supernet
        self.calibration = list(calibration)
        self.training = training
        self.validation = validation
        self.recipe = recipe

    def finetuned(self, genotype: Genotype) -> tuple[OneShotSupernet, list[dict]]:
        """Steps 1 and 2: the fine-tuned copy of the supernet and the training curve (one row per epoch)."""
        model = copy.deepcopy(self.supernet)
        recalibrate_batch_norm(model, genotype, self.calibration)
        parameters = list({id(p): p for module in model.path_modules(genotype) for p in module.parameters()}.values())
        run = train_supervised(model, self.training(), self.recipe, parameters=parameters,
                               forward=lambda x: model(x, genotype), name="candidate fine-tuning", quiet=True)
        return model, run.curve

    def __call__(self, genotype: Genotype) -> float:
        model, _ = self.finetuned(genotype)
        model.eval()
        correct, seen = 0, 0
        with torch.no_grad():
            for x, y in self.validation:
                correct += (model(x, genotype).argmax(1) == y).sum().item()
                seen += len(y)
        if seen == 0:
            raise ValueError("validation yielded no samples")
        return correct / seen


# --------------------------------------------------------------------------- the search


def _initial_design(rng: np.random.Generator, size: int) -> np.ndarray:
    """The cheapest and the most expensive architecture, then distinct uniform draws."""
    most_expensive = np.zeros(encoding.ENCODING_LENGTH, dtype=np.int64)
    ops = np.array(["op_" in name for name in encoding.VARIABLES])
    most_expensive[ops] = encoding.OPERATIONS.index("sep_conv_5x5")
    design = [np.zeros(encoding.ENCODING_LENGTH, dtype=np.int64), most_expensive][:size]
    seen = {encoding.key(v) for v in design}
    while len(design) < size:
        vector = encoding.random_vector(rng)
        if encoding.key(vector) not in seen:
            seen.add(encoding.key(vector))
            design.append(vector)
    return np.stack(design)


def _random_fill(rng: np.random.Generator, archive: np.ndarray, proposed: np.ndarray, count: int) -> np.ndarray:
    """``proposed`` topped up with uniform draws that are in neither, up to ``count`` rows."""
    seen = {encoding.key(v) for v in archive} | {encoding.key(v) for v in proposed}
    extra = []
    while len(proposed) + len(extra) < count:
        vector = encoding.random_vector(rng)
        if encoding.key(vector) not in seen:
            seen.add(encoding.key(vector))
            extra.append(vector)
    return np.concatenate([proposed, np.asarray(extra, dtype=np.int64).reshape(-1, encoding.ENCODING_LENGTH)])


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def nsganetv2_search(
    weight_part: ImageDataset,
    arch_part: ImageDataset,
    config: Nsganetv2Config,
    *,
    seed: int,
    device: torch.device | str,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> SearchResult:
    """Run NSGANetV2 on (possibly poisoned) search data.

    The supernet trains on ``weight_part``; architectures are measured on ``arch_part``.
    ``normalisation`` is the per-channel (mean, std) of the inputs (by default from the two
    halves together; pass the clean data's, as :func:`nbutils.nas.darts.darts_search` explains).

    Returns a :class:`~nbutils.nas.search_result.SearchResult`: ``genotype`` the architecture to retrain;
    ``history`` one row per measured architecture (``iteration`` 0 for the initial design,
    ``genotype``, ``val_acc``, ``cost``, ``predicted_acc`` or None); ``stages`` one record with
    the ``pareto_front`` (sorted by cost), the ``four_best`` and ``chosen`` (archive indices,
    i.e. rows of ``history``), the predictor chosen last (``surrogate``) and its cross-validated
    ``kendall_tau`` per model, per-iteration predictor records and the supernet's training
    history; ``alphas`` the archive as arrays (``archive_encodings``, ``archive_error``,
    ``archive_cost``, ``archive_iteration``, ``pareto_indices``, ``four_best``).
    """
    _check_search_arguments(weight_part, arch_part, config)
    device = torch.device(device)
    rng = np.random.default_rng(seed + 2)   # the design and random top-ups; seed, seed + 1 go to the loaders
    torch.manual_seed(seed)
    # 1. the lower level: the weight-sharing supernet, trained once
    measure, supernet_history = _lower_level(weight_part, arch_part, config, seed=seed, device=device,
                                             normalisation=normalisation)
    cost = ArchitectureCost(config.cost, channels=config.cost_channels, layers=config.cost_layers,
                            num_classes=weight_part.num_classes, in_channels=weight_part.in_channels,
                            input_size=config.cost_input_size or weight_part.image_size)
    # 2. the design of experiments, measured
    archive = _Archive(measure, cost)
    archive.measure(_initial_design(rng, config.initial_design), 0, None)
    # 3. iterations: predictor, NSGA-II on (predicted error, cost), the new candidates measured
    iterations: list[dict] = []
    predictor: FittedPredictor | None = None
    for iteration in progress(range(1, config.iterations + 1), desc="NSGANetV2 iterations"):
        predictor, record = _iteration(archive, iteration, config, cost, rng, seed)
        iterations.append(record)
    # 4. the Pareto front and the architecture retrained
    return _search_result(archive, iterations, predictor, supernet_history, config)


def _check_search_arguments(weight_part: ImageDataset, arch_part: ImageDataset, config: Nsganetv2Config) -> None:
    """Set-up (before step 1): the arguments of :func:`nsganetv2_search` checked."""
    if not isinstance(config, Nsganetv2Config):
        raise ValueError(f"config must be an Nsganetv2Config, got {type(config).__name__}")
    if weight_part.classes != arch_part.classes or weight_part.shape_chw != arch_part.shape_chw:
        raise ValueError(f"weight_part {weight_part!r} and arch_part {arch_part!r} must share classes and image shape")
    if len(weight_part) == 0 or len(arch_part) == 0:
        raise ValueError("weight_part and arch_part must both hold images")


def _lower_level(
    weight_part: ImageDataset,
    arch_part: ImageDataset,
    config: Nsganetv2Config,
    *,
    seed: int,
    device: torch.device,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None,
) -> tuple[PathEvaluator | FinetunedPathEvaluator, list[dict]]:
    """Step 1: the weight-sharing supernet trained; the evaluator of paths on the architecture half
    (fine-tuning each path on the weight half first when ``config.finetune_epochs > 0``) and the
    supernet's training history."""
    supernet = OneShotSupernet(channels=config.channels, num_classes=weight_part.num_classes, layers=config.layers,
                               in_channels=weight_part.in_channels).to(device)
    mean, std = normalisation or channel_stats(concatenate(weight_part, arch_part))
    common = dict(mean=mean, std=std, device=device)
    train_loader = BatchLoader(weight_part, config.batch_size, shuffle=True, seed=seed, augment=config.augment,
                               drop_last=len(weight_part) > config.batch_size, **common)
    supernet_history = train_one_shot(supernet, train_loader, config.training(), seed=seed)
    calibration = calibration_batches(
        BatchLoader(weight_part, config.batch_size, shuffle=True, seed=seed + 1, drop_last=len(weight_part) > config.batch_size,
                    **common),
        config.calibration_batches)
    validation = BatchLoader(arch_part, config.eval_batch_size, shuffle=False, seed=seed, **common)
    if config.finetune_epochs == 0:
        return PathEvaluator(supernet, calibration, validation), supernet_history

    def finetuning_loader() -> BatchLoader:
        return BatchLoader(weight_part, config.finetune_batch_size, shuffle=True, seed=seed + 3, augment=config.augment,
                           drop_last=len(weight_part) > config.finetune_batch_size, **common)

    measure = FinetunedPathEvaluator(supernet, calibration, finetuning_loader, validation, config.finetuning())
    return measure, supernet_history


class _Archive:
    """The measured architectures (steps 2 and 3): encodings, errors, costs and one history row each."""

    def __init__(self, evaluate: Callable[[Genotype], float], cost: Callable[[Genotype], float]):
        self.evaluate, self.cost = evaluate, cost
        self.encodings: list[np.ndarray] = []
        self.errors: list[float] = []
        self.costs: list[float] = []
        self.history: list[dict] = []

    def measure(self, vectors: np.ndarray, iteration: int, predicted_error: np.ndarray | None) -> None:
        """Measure ``vectors`` (their paths' accuracy and their cost) and add them to the archive."""
        for j, vector in enumerate(progress(vectors, desc=f"measure (iteration {iteration})")):
            genotype = encoding.decode(vector)
            accuracy = self.evaluate(genotype)
            self.encodings.append(vector)
            self.errors.append(1.0 - accuracy)
            self.costs.append(self.cost(genotype))
            self.history.append({
                "iteration": iteration, "genotype": genotype.to_dict(), "val_acc": accuracy, "cost": self.costs[-1],
                "predicted_acc": None if predicted_error is None else float(1.0 - predicted_error[j]),
            })


def _iteration(archive: _Archive, iteration: int, config: Nsganetv2Config, cost: ArchitectureCost,
               rng: np.random.Generator, seed: int) -> tuple[FittedPredictor, dict]:
    """Step 3, one iteration: fit the predictor, propose candidates by NSGA-II, measure them.

    Returns the predictor and the iteration's record."""
    upper = encoding.upper_bounds()
    encodings, errors = archive.encodings, archive.errors
    archive_vectors, objectives = np.stack(encodings), np.column_stack([errors, archive.costs])
    predictor = fit_predictor(config.predictor, archive_vectors / upper, np.asarray(errors), seed=seed + iteration,
                              folds=config.cv_folds, cart_trees=config.cart_trees)
    proposed = propose_candidates(archive_vectors, objectives, predictor, cost, config.candidates_per_iteration,
                                  config, seed=seed + iteration)
    if len(proposed) < config.candidates_per_iteration:
        log.info("iteration %d: NSGA-II gave %d new candidates; %d drawn at random", iteration, len(proposed),
                 config.candidates_per_iteration - len(proposed))
        proposed = _random_fill(rng, archive_vectors, proposed, config.candidates_per_iteration)
    predicted = predictor.predict(proposed / upper)
    archive.measure(proposed, iteration, predicted)
    measured = np.asarray(errors[-len(proposed):])
    record = {
        "iteration": iteration, "surrogate": predictor.name,
        "kendall_tau": {k: _finite_or_none(v) for k, v in predictor.kendall_tau.items()},
        "tau_on_candidates": _finite_or_none(kendall_tau(predicted, measured)),
    }
    log.info("iteration %d: %s predictor, best measured error %.3f", iteration, predictor.name, min(errors))
    return predictor, record


def _search_result(archive: _Archive, iterations: list[dict], predictor: FittedPredictor | None,
                   supernet_history: list[dict], config: Nsganetv2Config) -> SearchResult:
    """Step 4: the archive's Pareto front, its four best and the architecture retrained."""
    encodings, history = archive.encodings, archive.history
    errors_array, costs_array = np.asarray(archive.errors), np.asarray(archive.costs)
    front = non_dominated(np.column_stack([errors_array, costs_array]))
    front = front[np.lexsort((errors_array[front], costs_array[front]))]
    four_best, chosen = choose_retrained(errors_array, costs_array, front, config.tradeoff_points)
    stage = {
        "pareto_front": [{"index": int(i), "genotype": history[i]["genotype"], "val_acc": history[i]["val_acc"],
                          "cost": history[i]["cost"]} for i in front],
        "four_best": four_best,
        "chosen": chosen,
        "cost": config.cost,
        "surrogate": None if predictor is None else predictor.name,
        "kendall_tau": {} if predictor is None else {k: _finite_or_none(v) for k, v in predictor.kendall_tau.items()},
        "kendall_tau_std": {} if predictor is None else
        {k: _finite_or_none(v) for k, v in predictor.kendall_tau_std.items()},
        "iterations": iterations,
        "supernet": supernet_history,
    }
    return SearchResult(
        genotype=encoding.decode(encodings[chosen]),
        history=history,
        arrays={
            "archive_encodings": np.stack(encodings),
            "archive_error": errors_array,
            "archive_cost": costs_array,
            "archive_iteration": np.asarray([row["iteration"] for row in history], dtype=np.int64),
            "pareto_indices": front.astype(np.int64),
            "four_best": np.asarray(four_best, dtype=np.int64),
        },
        stages=[stage],
    )
