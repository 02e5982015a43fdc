"""The network TE-NAS measures: the DARTS search supernet with every operation of an edge
weighted ``1 / k`` over the ``k`` operations still alive on it (``switches``), affine batch
norm, pools without batch norm; and the switches that say which operations are alive.

Apart from the search (:mod:`nbutils.nas.tenas`) so that the NTK's replica path
(:mod:`nbutils.nas.ntk_replicas`) can read the network without importing the search.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..space.genotype import NUM_EDGES, STEPS
from ..space.ops import PRIMITIVES, FactorizedReduce, ReLUConvBN, build_op

CELL_TYPES: tuple[str, ...] = ("normal", "reduce")
#: the operations a TE-NAS search starts from: every DARTS operation but ``none``
SEARCH_OPERATIONS: tuple[str, ...] = tuple(p for p in PRIMITIVES if p != "none")
#: incoming edges kept per node (fixed by the DARTS genotype)
EDGES_PER_NODE = 2
#: the operation a candidate removes: (cell type, edge index, operation name)
Candidate = tuple[str, int, str]
#: per cell type, per edge, the operations still alive (an empty tuple: the edge is removed)
Switches = dict[str, list[tuple[str, ...]]]


class TenasCell(nn.Module):
    """A DARTS search cell as TE-NAS builds it: affine BN, pools without BN, every operation of
    an edge weighted ``1 / k`` over the ``k`` operations alive on it."""

    def __init__(self, c_prev_prev: int, c_prev: int, channels: int, reduction: bool, reduction_prev: bool,
                 switches: Sequence[Sequence[str]]):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, channels, affine=True)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=True)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=True)
        strides = [2 if reduction and src < 2 else 1 for node in range(STEPS) for src in range(2 + node)]
        self.edges = nn.ModuleList(
            nn.ModuleDict({name: build_op(name, channels, stride, affine=True) for name in ops})
            for stride, ops in zip(strides, switches)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, removed: frozenset[tuple[int, str]]) -> torch.Tensor:
        states = self.states(s0, s1, removed)
        return torch.cat(states[-STEPS:], dim=1)

    def states(self, s0: torch.Tensor, s1: torch.Tensor, removed: frozenset[tuple[int, str]],
               run: Callable[[nn.Module, torch.Tensor, int | None], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The two preprocessed inputs, then the node sums. ``run(module, h, j)`` evaluates a
        module on ``h``, state ``j`` of the cell (``None`` for the inputs of the preprocessing);
        by default ``module(h)`` (:mod:`nbutils.nas.ntk_replicas` evaluates replicas instead)."""
        run = run or (lambda module, h, j: module(h))
        states = [run(self.preprocess0, s0, None), run(self.preprocess1, s1, None)]
        offset = 0
        for node in range(STEPS):
            total = None
            for j, h in enumerate(states):
                edge = self.edges[offset + j]
                alive = [name for name in edge if (offset + j, name) not in removed]
                for name in alive:
                    term = run(edge[name], h, j) * (1.0 / len(alive))
                    total = term if total is None else total + term
            if total is None:
                raise ValueError(f"node {node + 2} of a {'reduction' if self.reduction else 'normal'} cell has no "
                                 f"operation left on any incoming edge")
            offset += len(states)
            states.append(total)
        return states


class TenasNetwork(nn.Module):
    """TE-NAS's supernet (``NASNetworkDARTS``, ``N = 1``): an optional stem (conv 3x3 to
    ``channels * stem_multiplier``, BN), ``cells`` cells with ``C``, ``2C``, ``4C`` channels
    (normal, reduction, reduction), BN + ReLU, global average pooling, linear classifier.

    ``switches`` lists, per cell type and edge, the operations the network is built with.
    :attr:`removed` holds candidates ``(cell type, edge, operation)`` that the forward skips
    (it reads the attribute at every call), so that one set of weights measures both an
    architecture and the same architecture without one operation or edge.
    ``stem=False`` is the thin network of the region count: the cells read the input itself.
    """

    def __init__(self, switches: Mapping[str, Sequence[Sequence[str]]], *, channels: int, num_classes: int,
                 in_channels: int, cells: int = 2, stem: bool = True, stem_multiplier: int = 1):
        super().__init__()
        switches = check_switches(switches)
        if cells not in (2, 3):
            raise ValueError(f"cells must be 2 or 3, got {cells!r}")
        if stem:
            c_stem = channels * stem_multiplier
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c_stem, 3, padding=1, bias=False), nn.BatchNorm2d(c_stem))
        else:
            self.stem = None
            c_stem = in_channels
        c_prev_prev, c_prev, reduction_prev = c_stem, c_stem, False
        self.cells = nn.ModuleList()
        for index in range(cells):
            reduction = index > 0
            c_curr = channels * 2 ** index
            cell_switches = switches["reduce" if reduction else "normal"]
            self.cells.append(TenasCell(c_prev_prev, c_prev, c_curr, reduction, reduction_prev, cell_switches))
            c_prev_prev, c_prev, reduction_prev = c_prev, STEPS * c_curr, reduction
        self.lastact = nn.Sequential(nn.BatchNorm2d(c_prev), nn.ReLU(inplace=False))
        self.classifier = nn.Linear(c_prev, num_classes)
        self.removed: frozenset[Candidate] = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        by_cell = {kind: frozenset((e, op) for c, e, op in self.removed if c == kind) for kind in CELL_TYPES}
        s0 = s1 = self.stem(x) if self.stem is not None else x
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, by_cell["reduce" if cell.reduction else "normal"])
        return self.classifier(F.adaptive_avg_pool2d(self.lastact(s1), 1).flatten(1))

    @contextmanager
    def without(self, candidates: Sequence[Candidate]) -> Iterator["TenasNetwork"]:
        """The network with these operations (or edges, given by their one operation) removed,
        for the duration of the block."""
        before = self.removed
        self.removed = before | frozenset(candidates)
        try:
            yield self
        finally:
            self.removed = before


def check_switches(switches: Mapping[str, Sequence[Sequence[str]]]) -> Switches:
    """Validate per-cell-type, per-edge operation lists; returns them as tuples."""
    if set(switches) != set(CELL_TYPES):
        raise ValueError(f"switches must have exactly the keys {CELL_TYPES}, got {sorted(switches)}")
    checked: Switches = {}
    for kind in CELL_TYPES:
        edges = [tuple(ops) for ops in switches[kind]]
        if len(edges) != NUM_EDGES:
            raise ValueError(f"switches[{kind!r}] must list {NUM_EDGES} edges, got {len(edges)}")
        for e, ops in enumerate(edges):
            unknown = [op for op in ops if op not in SEARCH_OPERATIONS]
            if unknown or len(set(ops)) != len(ops):
                raise ValueError(f"switches[{kind!r}][{e}] must list distinct operations of "
                                 f"{', '.join(SEARCH_OPERATIONS)}; got {ops}")
        checked[kind] = edges
    return checked


def initial_switches(operations: Sequence[str] = SEARCH_OPERATIONS) -> Switches:
    """``operations`` (by default every operation but ``none``) on every edge of both cell types."""
    return check_switches({kind: [tuple(operations)] * NUM_EDGES for kind in CELL_TYPES})
