"""The DARTS search network: every edge is a mixture of all candidate operations.

This is the plain version, written to read like the DARTS paper and to match
``quark0/darts`` (``cnn/model_search.py``) structurally: same operations, cells, channel
schedule, reduction positions, stem, preprocessing and BN settings (``affine=False``,
an extra BN after pools), and alpha of shape ``14 x 8`` per cell type. It is the
executable specification that any faster implementation is tested against.

Generalised, with the same parameters at the reference settings: any number of input
channels and classes, any input size.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .genotype import NUM_EDGES, STEPS, Genotype, parse_alpha
from .ops import PRIMITIVES, FactorizedReduce, ReLUConvBN, build_op


class MixedOp(nn.Module):
    """Sum of the candidate operations on one edge, weighted by softmax(alpha).

    ``primitives`` chooses which operations the edge keeps (all eight in DARTS; P-DARTS
    switches some off between stages). With ``skip_dropout > 0`` the identity skip is
    followed by dropout, as in P-DARTS (a strided skip is a FactorizedReduce and gets none).
    """

    def __init__(self, channels: int, stride: int, primitives: Sequence[str] = PRIMITIVES, skip_dropout: float = 0.0):
        super().__init__()
        self.primitives = tuple(primitives)
        ops = []
        for name in self.primitives:
            op = build_op(name, channels, stride, affine=False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(channels, affine=False))
            elif name == "skip_connect" and stride == 1 and skip_dropout > 0:
                op = nn.Sequential(op, nn.Dropout(skip_dropout))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class SearchCell(nn.Module):
    def __init__(self, c_prev_prev: int, c_prev: int, channels: int, reduction: bool, reduction_prev: bool,
                 switches: Sequence[Sequence[str]], skip_dropout: float = 0.0):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, channels, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=False)
        strides = [2 if reduction and src < 2 else 1 for node in range(STEPS) for src in range(2 + node)]
        self.edges = nn.ModuleList(
            MixedOp(channels, stride, primitives, skip_dropout) for stride, primitives in zip(strides, switches)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(STEPS):
            node = sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(node)
        return torch.cat(states[-STEPS:], dim=1)


class SuperNet(nn.Module):
    """DARTS supernet with architecture parameters ``alpha_normal`` and ``alpha_reduce``.

    ``weights()`` yields the network weights, ``arch_parameters()`` the two alphas, so that
    the two optimisers of the bi-level search never share a tensor.

    ``switches_normal`` / ``switches_reduce`` list, per edge, the operations it keeps
    (default: all eight); every edge must keep the same number, alpha has that many columns.
    """

    def __init__(
        self,
        channels: int = 16,
        num_classes: int = 10,
        layers: int = 8,
        in_channels: int = 3,
        stem_multiplier: int = 3,
        seed: int | None = None,
        switches_normal: Sequence[Sequence[str]] | None = None,
        switches_reduce: Sequence[Sequence[str]] | None = None,
        skip_dropout: float = 0.0,
    ):
        super().__init__()
        if layers < 3:
            raise ValueError(f"layers must be >= 3 (two reduction cells and one normal cell), got {layers}")
        self.channels, self.num_classes, self.layers = channels, num_classes, layers
        self.in_channels, self.stem_multiplier = in_channels, stem_multiplier
        self.switches_normal = _check_switches(switches_normal, "switches_normal")
        self.switches_reduce = _check_switches(switches_reduce, "switches_reduce")
        if len(self.switches_normal[0]) != len(self.switches_reduce[0]):
            raise ValueError("switches_normal and switches_reduce must keep the same number of operations per edge")
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in self.reduction_positions(layers)
            if reduction:
                c_curr *= 2
            switches = self.switches_reduce if reduction else self.switches_normal
            self.cells.append(SearchCell(c_prev_prev, c_prev, c_curr, reduction, reduction_prev, switches, skip_dropout))
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, STEPS * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        shape = (NUM_EDGES, len(self.switches_normal[0]))
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(shape, generator=generator))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(shape, generator=generator))

    def construction(self) -> dict:
        """The constructor arguments that rebuild this supernet's structure (JSON types)."""
        return {"channels": self.channels, "num_classes": self.num_classes, "layers": self.layers,
                "in_channels": self.in_channels, "stem_multiplier": self.stem_multiplier,
                "switches_normal": [list(ops) for ops in self.switches_normal],
                "switches_reduce": [list(ops) for ops in self.switches_reduce]}

    def checkpoint(self) -> dict:
        """Structure and state on the CPU: what :func:`supernet_from_checkpoint` rebuilds from."""
        return {"construction": self.construction(),
                "state": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}}

    @staticmethod
    def reduction_positions(layers: int) -> tuple[int, int]:
        return (layers // 3, 2 * layers // 3)

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha_normal, self.alpha_reduce]

    def weights(self) -> Iterator[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return (p for p in self.parameters() if id(p) not in arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_normal = F.softmax(self.alpha_normal, dim=-1)
        w_reduce = F.softmax(self.alpha_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def set_skip_dropout(self, p: float) -> None:
        """Change the dropout after identity skips (P-DARTS decays it within a stage)."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p

    def full_alpha(self, cell: str) -> np.ndarray:
        """Softmaxed alpha of one cell type spread over all eight operations (0 where switched off)."""
        alpha = self.alpha_normal if cell == "normal" else self.alpha_reduce
        switches = self.switches_normal if cell == "normal" else self.switches_reduce
        weights = F.softmax(alpha.detach().cpu().double(), dim=-1).numpy()
        full = np.zeros((NUM_EDGES, len(PRIMITIVES)))
        for e, names in enumerate(switches):
            for k, name in enumerate(names):
                full[e, PRIMITIVES.index(name)] = weights[e, k]
        return full

    def genotype(self) -> Genotype:
        """The DARTS discretisation of the current alpha (switched-off operations never chosen)."""
        return Genotype(normal=parse_alpha(self.full_alpha("normal")), reduce=parse_alpha(self.full_alpha("reduce")))

    def alphas_numpy(self) -> dict[str, np.ndarray]:
        return {
            "alpha_normal": self.alpha_normal.detach().cpu().numpy().copy(),
            "alpha_reduce": self.alpha_reduce.detach().cpu().numpy().copy(),
        }


def _check_switches(switches: Sequence[Sequence[str]] | None, name: str) -> list[tuple[str, ...]]:
    if switches is None:
        return [PRIMITIVES] * NUM_EDGES
    switches = [tuple(edge) for edge in switches]
    if len(switches) != NUM_EDGES:
        raise ValueError(f"{name}: expected {NUM_EDGES} edges, got {len(switches)}")
    sizes = {len(edge) for edge in switches}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"{name}: every edge must keep the same, non-zero number of operations, got sizes {sorted(sizes)}")
    for edge in switches:
        for op in edge:
            if op not in PRIMITIVES:
                raise ValueError(f"{name}: unknown operation {op!r}; allowed: {', '.join(PRIMITIVES)}")
        if len(set(edge)) != len(edge):
            raise ValueError(f"{name}: an edge lists an operation twice: {edge}")
    return switches


def supernet_from_checkpoint(checkpoint: dict, cls: type[SuperNet] = SuperNet) -> SuperNet:
    """The supernet a :meth:`SuperNet.checkpoint` describes, with its trained state."""
    model = cls(**checkpoint["construction"])
    model.load_state_dict(checkpoint["state"])
    return model
