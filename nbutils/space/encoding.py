"""DARTS genotypes as integer vectors, valid by construction (the search space NSGANetV2 evolves).

NSGANetV2 (Lu et al., 2020, ``mikelzc1990/nsganetv2``) runs NSGA-II over integer vectors
between per-variable bounds, and its accuracy surrogates read the same vectors. For the
DARTS space we need an encoding in which *every* vector between the bounds is an
architecture, so that crossover and mutation never produce an invalid one.

Layout. A cell has four intermediate nodes, node ``k`` (``k = 2..5``) reading two distinct
earlier states out of ``0..k-1``, each through one of the seven operations that are not
``none``. Per node we store

* the *input pair* as an index into the ``C(k, 2)`` pairs ``(a, b)``, ``a < b``, listed in
  lexicographic order. Node 2 has one pair only, ``(0, 1)``, so its index is left out;
* the operation on the edge from ``a`` and the operation on the edge from ``b``, as indices
  into :data:`OPERATIONS` (``PRIMITIVES`` without ``none``).

That is 2 + 3 + 3 + 3 = 11 variables per cell, the normal cell first, 22 in all
(:data:`ENCODING_LENGTH`), with lower bounds 0 and upper bounds :func:`upper_bounds`.
Pairs with distinct members make every node read two distinct states, which is exactly what
the DARTS discretisation produces, so the map is a bijection between vectors in the bounds
and genotypes with the default concatenation and the two genes of each node listed by
input (:func:`canonical`). Drawing each variable uniformly therefore samples architectures
uniformly, like :func:`nbutils.space.genotype.random_genotype`.
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np

from .genotype import DEFAULT_CONCAT, STEPS, Gene, Genotype
from .ops import PRIMITIVES

#: The operations an edge can take, in PRIMITIVES order (``none`` is never part of a genotype).
OPERATIONS: tuple[str, ...] = tuple(p for p in PRIMITIVES if p != "none")
CELLS: tuple[str, ...] = ("normal", "reduce")

#: For each node (0..STEPS-1, i.e. states 2..), the input pairs ``(a, b)``, ``a < b``, in order.
INPUT_PAIRS: tuple[tuple[tuple[int, int], ...], ...] = tuple(
    tuple(combinations(range(2 + node), 2)) for node in range(STEPS)
)


def _cell_variables() -> list[tuple[str, int]]:
    """(name, upper bound) of one cell's variables, in vector order."""
    variables = []
    for node, pairs in enumerate(INPUT_PAIRS):
        if len(pairs) > 1:
            variables.append((f"node{2 + node}.inputs", len(pairs) - 1))
        variables.append((f"node{2 + node}.op_first", len(OPERATIONS) - 1))
        variables.append((f"node{2 + node}.op_second", len(OPERATIONS) - 1))
    return variables


_CELL_VARIABLES = _cell_variables()
CELL_LENGTH = len(_CELL_VARIABLES)
ENCODING_LENGTH = len(CELLS) * CELL_LENGTH
#: A name for every variable, e.g. ``reduce.node4.inputs``, in vector order.
VARIABLES: tuple[str, ...] = tuple(f"{cell}.{name}" for cell in CELLS for name, _ in _CELL_VARIABLES)
_UPPER = np.array([upper for _ in CELLS for _, upper in _CELL_VARIABLES], dtype=np.int64)


def upper_bounds() -> np.ndarray:
    """The largest value of every variable (the lower bounds are all 0), a fresh copy."""
    return _UPPER.copy()


def lower_bounds() -> np.ndarray:
    return np.zeros(ENCODING_LENGTH, dtype=np.int64)


def canonical(genotype: Genotype) -> Genotype:
    """The same architecture with each node's two genes listed by input (what :func:`decode` returns).

    Raises ValueError for genotypes the encoding cannot hold: a node reading the same state
    twice, or a concatenation other than the four intermediate nodes.
    """
    return decode(encode(genotype))


def encode(genotype: Genotype) -> np.ndarray:
    """The integer vector (int64, length :data:`ENCODING_LENGTH`) of a genotype."""
    if not isinstance(genotype, Genotype):
        raise ValueError(f"genotype must be a Genotype, got {type(genotype).__name__}")
    for cell in CELLS:
        concat = getattr(genotype, f"{cell}_concat")
        if tuple(concat) != DEFAULT_CONCAT:
            raise ValueError(
                f"genotype.{cell}_concat must be {DEFAULT_CONCAT} to be encoded (every intermediate node), got {concat}"
            )
    return np.concatenate([_encode_cell(getattr(genotype, cell), cell) for cell in CELLS])


def _encode_cell(gene: Gene, cell: str) -> np.ndarray:
    values: list[int] = []
    for node, pairs in enumerate(INPUT_PAIRS):
        (op_1, src_1), (op_2, src_2) = sorted(gene[2 * node : 2 * node + 2], key=lambda pair: pair[1])
        if src_1 == src_2:
            raise ValueError(
                f"genotype.{cell}: node {2 + node} reads state {src_1} twice; the encoding needs two distinct inputs"
            )
        if len(pairs) > 1:
            values.append(pairs.index((src_1, src_2)))
        values += [OPERATIONS.index(op_1), OPERATIONS.index(op_2)]
    return np.asarray(values, dtype=np.int64)


def check_vector(vector: Sequence[int] | np.ndarray) -> np.ndarray:
    """``vector`` as int64 after checking its length, that it holds integers and that every
    variable lies in its bounds; raises ValueError naming the first offending variable."""
    array = np.asarray(vector)
    if array.shape != (ENCODING_LENGTH,):
        raise ValueError(f"vector must have shape ({ENCODING_LENGTH},), got {array.shape}")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"vector must hold integers, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError(f"vector must hold integers, got {array.tolist()}")
    array = array.astype(np.int64)
    bad = np.flatnonzero((array < 0) | (array > _UPPER))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"vector[{i}] ({VARIABLES[i]}) must lie in 0..{int(_UPPER[i])}, got {int(array[i])}")
    return array


def decode(vector: Sequence[int] | np.ndarray) -> Genotype:
    """The genotype of an integer vector; every vector within the bounds decodes."""
    array = check_vector(vector)
    cells = {}
    for c, cell in enumerate(CELLS):
        values = iter(array[c * CELL_LENGTH : (c + 1) * CELL_LENGTH].tolist())
        gene: list[tuple[str, int]] = []
        for pairs in INPUT_PAIRS:
            first, second = pairs[next(values)] if len(pairs) > 1 else pairs[0]
            gene += [(OPERATIONS[next(values)], first), (OPERATIONS[next(values)], second)]
        cells[cell] = tuple(gene)
    return Genotype(normal=cells["normal"], reduce=cells["reduce"])


def random_vector(rng: np.random.Generator) -> np.ndarray:
    """A uniform draw from the bounds: a uniformly random architecture of the space."""
    return rng.integers(0, _UPPER + 1).astype(np.int64)


def key(vector: Sequence[int] | np.ndarray) -> tuple[int, ...]:
    """A hashable identity of an encoded architecture (equal keys, equal architectures)."""
    return tuple(int(v) for v in check_vector(vector))
