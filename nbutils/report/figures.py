"""Figures: cell diagrams drawn with graphviz, in the style of DARTS' ``visualize.py``, and an
architecture's two cells as inline SVG for HTML (:func:`cells_html`).

``c_{k-2}`` and ``c_{k-1}`` are the cell's inputs, the numbered boxes its intermediate
nodes, ``c_{k}`` the concatenated output; each edge is labelled with its operation.
"""
from __future__ import annotations

import html

import graphviz

from ..space.genotype import Genotype
from ..space.ops import CONVOLUTIONS, POOLS

#: Edge colours by kind, so a reader sees at a glance how many convolutions a cell keeps.
EDGE_COLOURS = {"conv": "#1f77b4", "pool": "#d62728", "skip": "#7f7f7f"}


def _kind(op: str) -> str:
    return "conv" if op in CONVOLUTIONS else "pool" if op in POOLS else "skip"


def cell_diagram(genotype: Genotype, cell: str = "normal", title: str | None = None) -> graphviz.Digraph:
    if cell not in ("normal", "reduce"):
        raise ValueError(f"cell must be 'normal' or 'reduce', got {cell!r}")
    gene = getattr(genotype, cell)
    concat = getattr(genotype, f"{cell}_concat")
    g = graphviz.Digraph(
        format="svg",
        edge_attr={"fontsize": "11", "fontname": "helvetica"},
        node_attr={"style": "filled", "shape": "rect", "align": "center", "fontsize": "12",
                   "height": "0.4", "width": "0.4", "penwidth": "1.5", "fontname": "helvetica"},
        graph_attr={"rankdir": "LR"},
        engine="dot",
    )
    if title:
        g.attr(label=title, labelloc="t", fontsize="14", fontname="helvetica")
    g.node("c_{k-2}", fillcolor="darkseagreen2")
    g.node("c_{k-1}", fillcolor="darkseagreen2")
    steps = len(gene) // 2
    for i in range(steps):
        g.node(str(i), fillcolor="lightblue")
    for k, (op, src) in enumerate(gene):
        u = {0: "c_{k-2}", 1: "c_{k-1}"}.get(src, str(src - 2))
        g.edge(u, str(k // 2), label=op, color=EDGE_COLOURS[_kind(op)], fontcolor=EDGE_COLOURS[_kind(op)])
    g.node("c_{k}", fillcolor="palegoldenrod")
    for state in concat:
        u = {0: "c_{k-2}", 1: "c_{k-1}"}.get(state, str(state - 2))
        g.edge(u, "c_{k}", color="gray")
    return g


def cell_svg(genotype: Genotype, cell: str = "normal", title: str | None = None) -> str:
    """The diagram as an SVG string (needs graphviz's ``dot`` program)."""
    return cell_diagram(genotype, cell, title).pipe(format="svg").decode()


def cells_html(genotype: Genotype, caption: str) -> str:
    """One architecture's normal and reduction cells side by side, as inline SVG."""
    def strip_prolog(svg: str) -> str:  # inline SVG must not carry an XML declaration or doctype
        return svg[svg.index("<svg"):]

    return (
        f'<figure class="cells"><figcaption>{html.escape(caption)}<br><small>{html.escape(genotype.summary())}'
        f'</small></figcaption><div class="pair"><div>{strip_prolog(cell_svg(genotype, "normal", "normal cell"))}</div>'
        f'<div>{strip_prolog(cell_svg(genotype, "reduce", "reduction cell"))}</div></div></figure>'
    )
