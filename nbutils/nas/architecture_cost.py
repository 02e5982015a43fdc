"""The cost objective of NSGANetV2's search: parameters or multiply-accumulates of the network a
genotype builds, counted without building it (:class:`ArchitectureCost`)."""
from __future__ import annotations

import numpy as np
import torch

from ..space import encoding
from ..space.genotype import Genotype
from ..space.network import EvalNetwork, count_parameters
from ..space.ops import build_op

#: what the cost counts: parameters, or multiply-accumulates of convolutions and linear layers
COSTS: tuple[str, ...] = ("params", "macs")


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the convolutions and linear layers of one forward of ``x`` (batch 1)."""
    total = 0

    def conv_hook(module: torch.nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: torch.nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += module.in_features * module.out_features

    handles = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


class ArchitectureCost:
    """Parameters (``"params"``, auxiliary head excluded, as the papers count) or
    multiply-accumulates of convolutions and linear layers (``"macs"``) of the
    :class:`~nbutils.space.network.EvalNetwork` a genotype builds.

    Computed without building the network: the cost of the network with pools on every edge
    (pools have neither weights nor multiply-accumulates) plus, cell by cell, the cost of
    each chosen operation at that cell's channels, stride and input size, each measured once
    and cached. Equal to counting on the built network (tested).
    """

    def __init__(self, kind: str = "params", *, channels: int = 36, layers: int = 20, num_classes: int = 10,
                 in_channels: int = 3, input_size: int = 32):
        if kind not in COSTS:
            raise ValueError(f"kind must be one of {', '.join(COSTS)}, got {kind!r}")
        self.kind = kind
        cheapest = encoding.decode(np.zeros(encoding.ENCODING_LENGTH, dtype=np.int64))   # max_pool_3x3 everywhere
        network = EvalNetwork(cheapest, channels=channels, num_classes=num_classes, layers=layers,
                              auxiliary=False, in_channels=in_channels, input_size=input_size)
        if kind == "params":
            self.base = count_parameters(network)
        else:
            self.base = count_macs(network, torch.zeros(1, in_channels, input_size, input_size))
        # (reduction, channels, input size) of every cell, as EvalNetwork lays them out
        self._cells: list[tuple[bool, int, int]] = []
        c, size = channels, input_size
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c *= 2
            self._cells.append((reduction, c, size))
            if reduction:
                size = (size + 1) // 2
        self._op_costs: dict[tuple[str, int, int, int], int] = {}

    def _op_cost(self, op: str, channels: int, stride: int, size: int) -> int:
        key = (op, channels, stride, size if self.kind == "macs" else 0)
        if key not in self._op_costs:
            module = build_op(op, channels, stride, affine=True)
            if self.kind == "params":
                self._op_costs[key] = count_parameters(module)
            else:
                self._op_costs[key] = count_macs(module, torch.zeros(1, channels, size, size))
        return self._op_costs[key]

    def __call__(self, genotype: Genotype) -> float:
        total = self.base
        for reduction, channels, size in self._cells:
            gene = genotype.reduce if reduction else genotype.normal
            for op, src in gene:
                strided = reduction and src < 2
                # edges from the cell's inputs see the input size; in a reduction cell the
                # intermediate nodes are already halved
                in_size = (size + 1) // 2 if reduction and not strided else size
                total += self._op_cost(op, channels, 2 if strided else 1, in_size)
        return float(total)


