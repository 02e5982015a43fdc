"""A weight-sharing (one-shot) supernet of the DARTS space, trained by uniform single-path sampling.

NSGANetV2 evaluates candidate architectures by inheriting weights from a supernet rather than
training each from scratch (its "lower-level surrogate"). Its reference uses a once-for-all
MobileNetV3 supernet pretrained on ImageNet, which cannot be had offline; here the supernet
covers the DARTS space and is trained on the (possibly poisoned) search data, which is what
makes the algorithm training-based in the audit.

* Weights: the modules of the DARTS search network (:class:`nbutils.space.supernet.SuperNet`) with
  the seven operations other than ``none`` on every edge; its architecture parameters are
  never used. All cells of a type share the genotype's cell, as in the evaluation network.
* Forward of one path: for a genotype, each node sums the two chosen operations applied to
  the two chosen states; nothing else runs.
* Training (single-path one-shot, Guo et al., 2020, "Single Path One-Shot Neural
  Architecture Search with Uniform Sampling"): every batch draws one architecture uniformly
  (:func:`nbutils.space.genotype.random_genotype`) and takes an SGD step on that path only.
* Evaluation of a candidate: its path with the inherited weights, after the batch-norm
  running statistics are recomputed on a few training batches (the statistics collected
  while training mixed many paths and do not fit any single one); then the accuracy on the
  validation data with the network in evaluation mode.

A caveat worth knowing when reading results at toy scale: each operation's weights are
updated only on the batches whose path uses them (about one in twenty per edge and
operation), while the stem, the preprocessing and the classifier learn on every batch. An
under-trained supernet therefore favours parameter-free paths (pools, identity skips). On
Fashion-MNIST at 16 x 16 with 400 training images, C=8 and 5 cells, the pools-only cell
measured best after 20 epochs and was still on the front after 60.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..core.batches import BatchLoader
from ..space.encoding import OPERATIONS
from ..space.genotype import DEFAULT_CONCAT, STEPS, Genotype, random_genotype
from ..space.supernet import SuperNet
from ..training.loop import train_supervised
from ..training.recipe import TrainingRecipe

#: First row of each node in the supernet's edge list (node 2 reads states 0, 1; node 3 reads 0, 1, 2; ...).
_NODE_OFFSETS = tuple(sum(2 + j for j in range(node)) for node in range(STEPS))


class OneShotSupernet(nn.Module):
    """The DARTS search network's weights, run one architecture (path) at a time."""

    def __init__(self, channels: int = 16, num_classes: int = 10, layers: int = 8, in_channels: int = 3):
        super().__init__()
        switches = [OPERATIONS] * sum(2 + node for node in range(STEPS))
        self.net = SuperNet(channels=channels, num_classes=num_classes, layers=layers, in_channels=in_channels,
                            switches_normal=switches, switches_reduce=switches)
        # The DARTS architecture parameters are not part of a single-path network.
        for alpha in self.net.arch_parameters():
            alpha.requires_grad_(False)

    def weights(self) -> Iterable[nn.Parameter]:
        return self.net.weights()

    def _check(self, genotype: Genotype) -> None:
        for cell in ("normal", "reduce"):
            if tuple(getattr(genotype, f"{cell}_concat")) != DEFAULT_CONCAT:
                raise ValueError(f"genotype.{cell}_concat must be {DEFAULT_CONCAT} for the one-shot supernet")

    @staticmethod
    def _operation(cell: nn.Module, node: int, src: int, op_name: str) -> nn.Module:
        return cell.edges[_NODE_OFFSETS[node] + src].ops[OPERATIONS.index(op_name)]

    def forward(self, x: torch.Tensor, genotype: Genotype) -> torch.Tensor:
        self._check(genotype)
        net = self.net
        s0 = s1 = net.stem(x)
        for cell in net.cells:
            gene = genotype.reduce if cell.reduction else genotype.normal
            states = [cell.preprocess0(s0), cell.preprocess1(s1)]
            for node in range(STEPS):
                total = 0
                for op_name, src in gene[2 * node : 2 * node + 2]:
                    total = total + self._operation(cell, node, src, op_name)(states[src])
                states.append(total)
            s0, s1 = s1, torch.cat(states[2:], dim=1)
        return net.classifier(net.global_pooling(s1).flatten(1))

    def path_modules(self, genotype: Genotype) -> list[nn.Module]:
        """The modules a forward of ``genotype`` runs (stem, preprocessing, chosen operations, classifier)."""
        self._check(genotype)
        net = self.net
        modules: list[nn.Module] = [net.stem]
        for cell in net.cells:
            gene = genotype.reduce if cell.reduction else genotype.normal
            modules += [cell.preprocess0, cell.preprocess1]
            modules += [self._operation(cell, k // 2, src, op_name) for k, (op_name, src) in enumerate(gene)]
        modules.append(net.classifier)
        return modules


def train_one_shot(
    supernet: OneShotSupernet, loader: BatchLoader, recipe: TrainingRecipe, *, seed: int
) -> list[dict]:
    """Train the supernet in place with the shared loop
    (:func:`nbutils.training.loop.train_supervised`), one uniformly drawn architecture per batch
    (drawn from a ``numpy`` generator seeded with ``seed``). Returns one row per epoch: learning
    rate, mean training loss and accuracy (of the sampled paths). Raises RuntimeError on a
    non-finite loss, naming the epoch."""
    rng = np.random.default_rng(seed)

    def sampled_path(x: torch.Tensor) -> torch.Tensor:
        return supernet(x, random_genotype(rng))

    run = train_supervised(supernet, loader, recipe, parameters=supernet.weights(), forward=sampled_path,
                           name="one-shot supernet")
    return run.curve


def recalibrate_batch_norm(supernet: OneShotSupernet, genotype: Genotype, batches: Sequence[torch.Tensor]) -> None:
    """Replace the running statistics of the batch-norm layers on ``genotype``'s path by the
    plain average over ``batches`` of the batch statistics the path produces (train-mode
    forwards, no gradient). Leaves the path's modules in evaluation mode; modules off the path
    are not touched (the network has thousands of modules, a path a few hundred)."""
    if not batches:
        raise ValueError("batches must hold at least one batch to recalibrate batch norm, got none")
    path = supernet.path_modules(genotype)
    norms = [m for module in path for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None   # cumulative moving average: every batch weighs the same
    for module in path:
        module.train()
    try:
        with torch.no_grad():
            for x in batches:
                supernet(x, genotype)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for module in path:
            module.eval()


class PathEvaluator:
    """Validation accuracy of architectures with weights inherited from a trained supernet.

    ``calibration`` are the input batches every candidate's batch norm is recalibrated on
    (the same batches for every candidate, so that candidates are compared alike);
    ``validation`` yields the (input, label) batches the accuracy is measured on.
    """

    def __init__(self, supernet: OneShotSupernet, calibration: Sequence[torch.Tensor],
                 validation: Iterable[tuple[torch.Tensor, torch.Tensor]]):
        if not calibration:
            raise ValueError("calibration must hold at least one batch, got none")
        self.supernet = supernet
        self.calibration = list(calibration)
        self.validation = validation

    def __call__(self, genotype: Genotype) -> float:
        recalibrate_batch_norm(self.supernet, genotype, self.calibration)
        correct, seen = 0, 0
        with torch.no_grad():
            for x, y in self.validation:
                correct += (self.supernet(x, genotype).argmax(1) == y).sum().item()
                seen += len(y)
        if seen == 0:
            raise ValueError("validation yielded no samples")
        return correct / seen


def calibration_batches(loader: BatchLoader, count: int) -> list[torch.Tensor]:
    """The inputs of the first ``count`` batches of one pass of ``loader`` (fewer if it has fewer)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    batches = []
    for x, _ in loader:
        batches.append(x)
        if len(batches) == count:
            break
    return batches
