"""TE-NAS's pruning rule (step 2 and 3 of :mod:`nbutils.nas.tenas`): each candidate's change of
the two indicators when it is removed, rounded as the reference rounds; the candidates ranked by
the sum of their dense ranks under each indicator; which operations of every edge, and which
edges of a node, are pruned. Pure functions of the measured values.
"""
from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

from .tenas_network import EDGES_PER_NODE, Candidate


def round_significant(value: float, digits: int) -> float:
    """``value`` rounded to ``digits`` significant digits, as the reference's ``round_to``
    (which adds 1e-8 to the magnitude first)."""
    if value == 0 or not math.isfinite(value):
        return value
    magnitude = abs(value) + 1e-8
    power = math.floor(math.log10(magnitude)) + 1
    return math.copysign(round(magnitude * 10.0 ** (-power), digits) * 10.0 ** power, value)


def _dense_ranks(keys: Sequence[Hashable], values: Mapping[Hashable, float], descending: bool,
                 precision: int) -> dict[Hashable, int]:
    """The reference's ranking: sort (stably) by the value rounded to ``precision``
    significant digits; walking the sorted list, a value equal to its predecessor's shares its
    rank, any other gets the predecessor's rank + 1."""
    ordered = sorted(keys, key=lambda k: round_significant(values[k], precision), reverse=descending)
    ranks: dict[Hashable, int] = {}
    for i, key in enumerate(ordered):
        if i == 0:
            ranks[key] = 0
        else:
            previous = ordered[i - 1]
            ranks[key] = ranks[previous] if values[key] == values[previous] else ranks[previous] + 1
    return ranks


def rank_candidates(kappa_change: Mapping[Hashable, float], region_change: Mapping[Hashable, float],
                    precision: int = 3) -> list[tuple[Hashable, int, int]]:
    """``[(candidate, kappa rank, region rank)]``, most prunable first.

    ``kappa_change`` ranks descending (a larger drop of kappa when the candidate is removed is
    better), ``region_change`` ascending (a more negative change, i.e. more regions without the
    candidate, is better); the list is sorted by the sum of the two ranks, stably, ties in the
    order of the kappa ranking (as the reference's dict of rankings)."""
    keys = list(kappa_change)
    if set(keys) != set(region_change):
        raise ValueError("kappa_change and region_change must have the same candidates")
    if not keys:
        raise ValueError("rank_candidates needs at least one candidate")
    for name, table in (("kappa_change", kappa_change), ("region_change", region_change)):
        bad = [k for k in keys if not math.isfinite(table[k])]
        if bad:
            raise ValueError(f"{name} must be finite for every candidate; not for {bad[:3]}")
    by_kappa = _dense_ranks(keys, kappa_change, descending=True, precision=precision)
    by_regions = _dense_ranks(keys, region_change, descending=False, precision=precision)
    in_kappa_order = sorted(keys, key=lambda k: round_significant(kappa_change[k], precision), reverse=True)
    ranked = [(k, by_kappa[k], by_regions[k]) for k in in_kappa_order]
    return sorted(ranked, key=lambda row: row[1] + row[2])


def operations_to_prune(ranking: Sequence[tuple[Candidate, int, int]], per_edge: int) -> list[Candidate]:
    """On every edge, the ``per_edge`` candidates that come first in ``ranking``."""
    if isinstance(per_edge, bool) or not isinstance(per_edge, int) or per_edge < 1:
        raise ValueError(f"per_edge must be an int >= 1, got {per_edge!r}")
    chosen: dict[tuple[str, int], list[Candidate]] = {}
    for candidate, _, _ in ranking:
        picks = chosen.setdefault(candidate[:2], [])
        if len(picks) < per_edge:
            picks.append(candidate)
    return [c for picks in chosen.values() for c in picks]


def edges_to_prune(ranking: Sequence[tuple[Candidate, int, int]], keep: int = EDGES_PER_NODE) -> list[Candidate]:
    """All candidates of one node's ranking but the last ``keep`` (the highest rank sums)."""
    return [candidate for candidate, _, _ in ranking[: max(0, len(ranking) - keep)]]


def relative_change(origin: float, candidate: float, precision: int) -> float:
    """``round((origin - candidate) / origin, precision)``: one repetition's change."""
    return round((origin - candidate) / origin, precision)
