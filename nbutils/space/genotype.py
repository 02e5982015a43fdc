"""Discrete architectures of the DARTS space: genotypes.

A cell has two inputs (0: output of the cell before the previous one, 1: output of the
previous cell) and ``STEPS`` intermediate nodes numbered 2.. ; node ``i`` sums two genes,
each an earlier state through one operation. A genotype lists, for the normal and the
reduction cell, the ``(operation, input)`` pairs node by node, and which states are
concatenated into the cell output. The two genes of a node may read the same state (the
audit's random baseline draws such nodes, see :func:`random_genotype`; the DARTS
discretisation never produces them): the evaluation networks build them, the integer
encoding of :mod:`nbutils.space.encoding` refuses them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .ops import CONVOLUTIONS, POOLS, PRIMITIVES

STEPS = 4
#: Edges of one cell in the order alpha's rows follow: node 2 reads states 0,1; node 3 reads 0,1,2; ...
NUM_EDGES = sum(2 + i for i in range(STEPS))
DEFAULT_CONCAT = tuple(range(2, 2 + STEPS))

Gene = tuple[tuple[str, int], ...]


def _validate_gene(gene: Sequence[Sequence], cell: str) -> Gene:
    pairs = tuple((str(op), int(src)) for op, src in gene)
    if len(pairs) != 2 * STEPS:
        raise ValueError(f"genotype.{cell}: expected {2 * STEPS} (operation, input) pairs, got {len(pairs)}")
    for k, (op, src) in enumerate(pairs):
        node = 2 + k // 2
        if op not in PRIMITIVES or op == "none":
            allowed = ", ".join(p for p in PRIMITIVES if p != "none")
            raise ValueError(f"genotype.{cell}[{k}]: unknown operation {op!r}; allowed: {allowed}")
        if not 0 <= src < node:
            raise ValueError(
                f"genotype.{cell}[{k}]: node {node} reads input {src}, which does not exist "
                f"(allowed: 0..{node - 1})"
            )
    return pairs


@dataclass(frozen=True)
class Genotype:
    normal: Gene
    reduce: Gene
    normal_concat: tuple[int, ...] = DEFAULT_CONCAT
    reduce_concat: tuple[int, ...] = DEFAULT_CONCAT

    def __post_init__(self) -> None:
        object.__setattr__(self, "normal", _validate_gene(self.normal, "normal"))
        object.__setattr__(self, "reduce", _validate_gene(self.reduce, "reduce"))
        for name in ("normal_concat", "reduce_concat"):
            concat = tuple(int(i) for i in getattr(self, name))
            if not concat or any(not 0 <= i < 2 + STEPS for i in concat):
                raise ValueError(f"genotype.{name}: states must be in 0..{1 + STEPS}, got {concat}")
            object.__setattr__(self, name, concat)

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "normal": [list(p) for p in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(p) for p in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Genotype":
        unknown = set(d) - {"normal", "normal_concat", "reduce", "reduce_concat"}
        if unknown:
            raise ValueError(f"genotype: unknown keys {sorted(unknown)}")
        missing = {"normal", "reduce"} - set(d)
        if missing:
            raise ValueError(f"genotype: missing keys {sorted(missing)}")
        return cls(
            normal=d["normal"],
            reduce=d["reduce"],
            normal_concat=d.get("normal_concat", DEFAULT_CONCAT),
            reduce_concat=d.get("reduce_concat", DEFAULT_CONCAT),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Genotype":
        return cls.from_dict(json.loads(text))

    # --- what the papers reason about -------------------------------------------------------
    def counts(self, cell: str) -> dict[str, int]:
        """Number of convolutions, pools and skip connections in one cell."""
        ops = [op for op, _ in getattr(self, cell)]
        return {
            "conv": sum(op in CONVOLUTIONS for op in ops),
            "pool": sum(op in POOLS for op in ops),
            "skip": sum(op == "skip_connect" for op in ops),
        }

    def summary(self) -> str:
        n, r = self.counts("normal"), self.counts("reduce")
        return (
            f"normal: {n['conv']} conv, {n['pool']} pool, {n['skip']} skip | "
            f"reduce: {r['conv']} conv, {r['pool']} pool, {r['skip']} skip"
        )


def parse_alpha(weights: np.ndarray) -> Gene:
    """The reference discretisation of one cell's (softmaxed) alpha, ``NUM_EDGES x len(PRIMITIVES)``.

    For each node keep the two incoming edges whose strongest non-``none`` weight is largest,
    and on each the arg-max non-``none`` operation. Ties go to the lower index, as in the
    reference (a stable sort and a strict comparison).
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (NUM_EDGES, len(PRIMITIVES)):
        raise ValueError(f"alpha must have shape {(NUM_EDGES, len(PRIMITIVES))}, got {weights.shape}")
    none = PRIMITIVES.index("none")
    gene: list[tuple[str, int]] = []
    start = 0
    for i in range(STEPS):
        rows = weights[start : start + 2 + i]
        strength = [max(w for k, w in enumerate(row) if k != none) for row in rows]
        edges = sorted(range(2 + i), key=lambda j: -strength[j])[:2]
        for j in edges:
            best = max((k for k in range(len(PRIMITIVES)) if k != none), key=lambda k: (rows[j][k], -k))
            gene.append((PRIMITIVES[best], j))
        start += 2 + i
    return tuple(gene)


def genotype_from_alpha(alpha_normal: np.ndarray, alpha_reduce: np.ndarray) -> Genotype:
    """Derive a genotype from raw (pre-softmax) architecture parameters."""

    def softmax(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    return Genotype(normal=parse_alpha(softmax(alpha_normal)), reduce=parse_alpha(softmax(alpha_reduce)))


#: How :func:`random_genotype` draws a node's two inputs.
INPUT_SAMPLERS: tuple[str, ...] = ("distinct", "independent")


def random_genotype(rng: np.random.Generator, sampler: str = "distinct") -> Genotype:
    """A random architecture: every gene's operation uniform over the seven non-``none``
    operations (``dil_conv_5x5`` included, unlike RoBoT's sampler), the inputs drawn as
    ``sampler`` says.

    * ``"distinct"``: each node reads two distinct earlier states, the pair uniform (the form
      the DARTS discretisation produces); the two genes are listed by input.
    * ``"independent"``: each gene draws its input uniformly and independently of the other gene
      of its node, so node ``j`` (states ``0..j-1`` to choose from) reads one state twice with
      probability ``1/j``: 1/2, 1/3, 1/4, 1/5 for nodes 2..5, 77/60 such nodes per cell on
      average. This is the audit's random baseline (``ztcoalson/pdarts`` ``random_genotype.py``,
      which made its ``RANDOM_1..10``); the genes keep their drawing order.
    """
    if sampler not in INPUT_SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(INPUT_SAMPLERS)}, got {sampler!r}")
    ops = [p for p in PRIMITIVES if p != "none"]

    def distinct_cell() -> Gene:
        gene = []
        for i in range(STEPS):
            for src in sorted(rng.choice(2 + i, size=2, replace=False)):
                gene.append((ops[rng.integers(len(ops))], int(src)))
        return tuple(gene)

    def independent_cell() -> Gene:
        return tuple((ops[rng.integers(len(ops))], int(rng.integers(2 + k // 2))) for k in range(2 * STEPS))

    cell = distinct_cell if sampler == "distinct" else independent_cell
    return Genotype(normal=cell(), reduce=cell())


#: Published genotypes, as in ``quark0/darts`` and ``chenxin061/pdarts`` ``genotypes.py``.
PUBLISHED: dict[str, Genotype] = {
    "DARTS_V1": Genotype(
        normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
                ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    ),
    "DARTS_V2": Genotype(
        normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    ),
    "PDARTS": Genotype(
        normal=[("skip_connect", 0), ("dil_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("dil_conv_5x5", 4)],
        reduce=[("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
                ("max_pool_3x3", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1), ("dil_conv_5x5", 3)],
    ),
}


def published(name: str) -> Genotype:
    if name not in PUBLISHED:
        raise ValueError(f"unknown genotype name {name!r}; known: {', '.join(PUBLISHED)}")
    return PUBLISHED[name]


def iter_edges() -> Iterable[tuple[int, int]]:
    """``(node, src)`` for every edge of a cell, in alpha's row order."""
    for node in range(2, 2 + STEPS):
        for src in range(node):
            yield node, src
