"""Tests for the integer encoding of DARTS genotypes (nbutils.space.encoding)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nbutils.space import encoding
from nbutils.space.genotype import PUBLISHED, STEPS, Genotype, random_genotype
from nbutils.space.ops import PRIMITIVES


def node_genes(genotype: Genotype, cell: str) -> list[set[tuple[str, int]]]:
    gene = getattr(genotype, cell)
    return [set(gene[2 * i : 2 * i + 2]) for i in range(STEPS)]


def test_layout_has_no_degenerate_variable_and_the_expected_size():
    upper = encoding.upper_bounds()
    assert encoding.ENCODING_LENGTH == len(upper) == len(encoding.VARIABLES) == 22
    assert np.all(upper >= 1)  # a variable with a single value would be dead weight for the search
    # node k picks one of C(k, 2) input pairs and 7 x 7 operations; two cells
    per_cell = math.prod(math.comb(k, 2) * 7 * 7 for k in range(2, 2 + STEPS))
    assert math.prod(int(u) + 1 for u in upper) == per_cell**2
    assert encoding.OPERATIONS == tuple(p for p in PRIMITIVES if p != "none")


def test_round_trip_over_random_genotypes():
    rng = np.random.default_rng(0)
    for _ in range(500):
        genotype = random_genotype(rng)
        vector = encoding.encode(genotype)
        assert vector.dtype == np.int64 and vector.shape == (encoding.ENCODING_LENGTH,)
        assert encoding.decode(vector) == genotype


def test_published_genotypes_round_trip_up_to_gene_order():
    for name, genotype in PUBLISHED.items():
        decoded = encoding.decode(encoding.encode(genotype))
        for cell in ("normal", "reduce"):
            assert node_genes(decoded, cell) == node_genes(genotype, cell), name
        assert encoding.canonical(decoded) == decoded


def test_every_vector_in_the_bounds_decodes_to_a_valid_genotype_and_back():
    rng = np.random.default_rng(1)
    upper = encoding.upper_bounds()
    vectors = [np.zeros_like(upper), upper] + [encoding.random_vector(rng) for _ in range(3000)]
    seen_values = np.zeros((encoding.ENCODING_LENGTH, int(upper.max()) + 1), dtype=bool)
    for vector in vectors:
        assert np.all((vector >= 0) & (vector <= upper))
        seen_values[np.arange(len(vector)), vector] = True
        genotype = encoding.decode(vector)          # Genotype validates ops and input ranges
        for cell in ("normal", "reduce"):
            gene = getattr(genotype, cell)
            for node in range(STEPS):
                (op_a, a), (op_b, b) = gene[2 * node : 2 * node + 2]
                assert a < b < 2 + node                 # two distinct, existing inputs
                assert "none" not in (op_a, op_b)
        assert np.array_equal(encoding.encode(genotype), vector)   # injective
    # the random draws reach every value of every variable, the upper bounds included
    for i, u in enumerate(upper):
        assert seen_values[i, : u + 1].all(), encoding.VARIABLES[i]


def test_float_vectors_with_integral_values_decode_like_integers():
    vector = encoding.random_vector(np.random.default_rng(2))
    assert encoding.decode(vector.astype(float)) == encoding.decode(vector)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda v: v[:-1], "shape"),
        (lambda v: np.where(np.arange(len(v)) == 3, encoding.upper_bounds()[3] + 1, v), r"vector\[3\]"),
        (lambda v: np.where(np.arange(len(v)) == 0, -1, v), r"vector\[0\] \(normal.node2.op_first\)"),
        (lambda v: v + 0.5, "integers"),
        (lambda v: v.astype(bool), "integers"),
    ],
)
def test_bad_vectors_are_refused_with_the_variable_named(change, message):
    vector = encoding.random_vector(np.random.default_rng(3))
    with pytest.raises(ValueError, match=message):
        encoding.decode(change(vector))


def test_genotypes_outside_the_encoding_are_refused():
    genotype = random_genotype(np.random.default_rng(4))
    twice = list(genotype.normal)
    twice[1] = (twice[1][0], twice[0][1])   # node 2 reads the same state twice
    with pytest.raises(ValueError, match="twice"):
        encoding.encode(Genotype(normal=twice, reduce=genotype.reduce))
    with pytest.raises(ValueError, match="normal_concat"):
        encoding.encode(Genotype(normal=genotype.normal, reduce=genotype.reduce, normal_concat=(2, 3)))
    with pytest.raises(ValueError, match="Genotype"):
        encoding.encode(genotype.to_dict())


def test_key_identifies_architectures():
    rng = np.random.default_rng(5)
    a, b = random_genotype(rng), random_genotype(rng)
    assert encoding.key(encoding.encode(a)) == encoding.key(encoding.encode(encoding.canonical(a)))
    assert encoding.key(encoding.encode(a)) != encoding.key(encoding.encode(b))
