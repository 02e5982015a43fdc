"""Figures and worked numbers for the notebooks read as lessons: what a student looks at between
the steps (alpha's softmax epoch by epoch, the crafting loss, the learning curve, the metrics
clean against poisoned, the statistics of one report cell worked by hand).

Each function only reads what a stage has already computed and saved (a search's history and
arrays, a poison set's header, a retraining's curve, a sensitivity table, the report's results),
so a notebook can show it when the pipeline runs it too without changing what the stage writes.
Figures are matplotlib ``Figure`` objects (no pyplot state), shown with
:func:`nbutils.report.charts.figure_image`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..space.genotype import Genotype, iter_edges
from ..space.ops import PRIMITIVES
from .stats import benjamini_hochberg, delta_improvement, welch_less


def softmax(alpha: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (the operations of an edge): the weights of DARTS' mixed operation."""
    alpha = np.asarray(alpha, dtype=np.float64)
    shifted = np.exp(alpha - alpha.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def edge_names() -> list[str]:
    """The rows of alpha: ``node <- input`` for every edge of a cell, inputs ``c_{k-2}``, ``c_{k-1}``
    named as in the cell diagrams."""
    names = {0: "c_{k-2}", 1: "c_{k-1}"}
    return [f"{node - 2} <- {names.get(src, src - 2)}" for node, src in iter_edges()]


def alpha_heatmaps(alphas: np.ndarray, title: str = "normal cell", columns: int = 4, max_panels: int = 8) -> Figure:
    """One heatmap per epoch of ``softmax(alpha)``: rows the cell's 14 edges, columns the 8
    operations. ``alphas``: the search's trace of one cell, epochs x edges x operations (raw
    alpha, as :func:`nbutils.nas.darts.darts_search` saves it). A row that stays flat (all
    1/8) is an edge whose choice has not moved. At most ``max_panels`` epochs, evenly spaced."""
    weights = softmax(alphas)
    shown = spread(list(range(len(weights))), max_panels)
    weights = weights[shown]
    epochs = len(weights)
    columns = max(1, min(columns, epochs))
    rows = math.ceil(epochs / columns)
    fig = Figure(figsize=(3.1 * columns + 1.2, 3.6 * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, columns, squeeze=False))
    # diverging around the uniform weight 1/8 (undecided): blue edges lose an operation, red ones choose it
    uniform = 1.0 / weights.shape[-1]
    spread_ = max(float(np.abs(weights - uniform).max()), 1e-6)
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= epochs:
            ax.set_visible(False)
            continue
        image = ax.imshow(weights[i], cmap="RdBu_r", vmin=uniform - spread_, vmax=uniform + spread_, aspect="auto")
        ax.set_title(f"after epoch {shown[i] + 1}", fontsize=9)
        ax.set_xticks(range(len(PRIMITIVES)), PRIMITIVES, rotation=90, fontsize=7)
        ax.set_yticks(range(weights.shape[1]), edge_names() if i % columns == 0 else [""] * weights.shape[1],
                      fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label=f"softmax(alpha); white = 1/{weights.shape[-1]}, undecided")
    fig.suptitle(f"{title}: the mixed operation's weights, epoch by epoch")
    return fig


def epoch_genotypes(history: list[dict]) -> list[tuple[int, Genotype]]:
    """The cell a search would have returned after each epoch (DARTS, P-DARTS: its history rows
    that carry a genotype)."""
    return [(row["epoch"], Genotype.from_dict(row["genotype"])) for row in history
            if "genotype" in row and "epoch" in row]


def spread(items: list, count: int) -> list:
    """At most ``count`` of ``items``, evenly spaced, the first and the last among them (a long
    search's epochs, shown as a few)."""
    if len(items) <= count:
        return list(items)
    picks = sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)})
    return [items[i] for i in picks]


def cell_counts(genotype: Genotype) -> dict[str, int]:
    """Convolutions, pools and skips of the normal cell: what the papers read a cell by."""
    return dict(genotype.counts("normal"))


def curve_figure(values, title: str, xlabel: str = "step", ylabel: str = "objective",
                 log: bool = False) -> Figure:
    """A single curve (the crafting objective per step, say), markers on every point."""
    values = np.asarray(values, dtype=np.float64)
    fig = Figure(figsize=(5.5, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(np.arange(len(values)), values, marker="o", markersize=3)
    if log and (values > 0).all():
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig


def learning_curve(curve: list[dict], test_acc: float | None = None, title: str = "retraining") -> Figure:
    """A retraining's curve: training loss (left) and training accuracy (right) per epoch, with
    the final test accuracy as a dashed line."""
    frame = pd.DataFrame(curve)
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    loss, acc = fig.subplots(1, 2)
    loss.plot(frame["epoch"], frame["train_loss"], marker="o")
    loss.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    acc.plot(frame["epoch"], 100 * frame["train_acc"], marker="o", label="training accuracy")
    if test_acc is not None:
        acc.axhline(100 * test_acc, linestyle="--", color="C3", label=f"test accuracy {100 * test_acc:.1f}%")
    acc.set(title="accuracy", xlabel="epoch", ylabel="%")
    acc.legend(fontsize=8)
    for ax in (loss, acc):
        ax.grid(alpha=0.3)
        ax.set_xticks(frame["epoch"])
    fig.suptitle(title)
    return fig


def metric_scatter(table: pd.DataFrame, columns: int = 3) -> Figure:
    """Each training-free metric of every random architecture on clean data (x) against the
    same architecture on poisoned data (y), one panel per metric; on the diagonal the metric
    did not see the poisons. ``table``: the sensitivity stage's table (``architecture``,
    ``metric``, ``clean``, ``poisoned``)."""
    metrics = list(dict.fromkeys(table["metric"]))
    columns = max(1, min(columns, len(metrics)))
    rows = math.ceil(len(metrics) / columns)
    fig = Figure(figsize=(3.2 * columns, 3.0 * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, columns, squeeze=False))
    for ax, metric in zip(axes.flat, metrics):
        part = table[table["metric"] == metric]
        x, y = part["clean"].to_numpy(float), part["poisoned"].to_numpy(float)
        ax.scatter(x, y, s=18)
        finite = np.isfinite(np.concatenate([x, y]))
        if finite.any():
            both = np.concatenate([x, y])[finite]
            low, high = both.min(), both.max()
            pad = 0.05 * (high - low or abs(high) or 1.0)
            ax.plot([low - pad, high + pad], [low - pad, high + pad], color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("clean", fontsize=8)
        ax.set_ylabel("poisoned", fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("the same architectures' metrics on clean (x) and poisoned (y) data")
    return fig


def worked_row(table: pd.DataFrame):
    """The report cell to work by hand: the first poisoned cell of a :func:`~nbutils.report.table_cells.results_table`
    whose Welch test is defined (its p-value finite), or None."""
    tested = table[(table.attack != "none") & table.p.notna()]
    return None if tested.empty else tested.iloc[0]


def worked_cell(results: pd.DataFrame, algorithm: str, attack: str, budget, alpha: float = 0.05) -> dict:
    """One cell of the robustness table worked by hand, number by number: the clean and the
    poisoned trials' accuracies, their means and sample standard deviations, Welch's t and its
    Welch-Satterthwaite degrees of freedom, the one-sided p-value, its Benjamini-Hochberg
    adjustment among the algorithm's poisoned cells, and dImp against random sampling.

    ``results``: :func:`nbutils.report.results.load_results`'s rows of the table's dataset and
    study (accuracies in percent), as :func:`~nbutils.report.table_cells.results_table` reads them.
    The p-values come from the report's own functions (:mod:`nbutils.report.stats`), so they
    agree with the table; t and the degrees of freedom are spelled out here."""
    ours = results[results.algorithm == algorithm]
    clean = ours.loc[ours.attack == "none", "acc"].to_numpy(float)
    random = results.loc[results.algorithm == "random", "acc"].to_numpy(float)

    def rows(a, b) -> np.ndarray:
        same = ours.budget.isna() if b is None or (isinstance(b, float) and math.isnan(b)) else ours.budget == b
        return ours.loc[(ours.attack == a) & same, "acc"].to_numpy(float)

    poisoned = rows(attack, budget)
    m_c, m_p = clean.mean(), poisoned.mean()
    s_c, s_p = clean.std(ddof=1), poisoned.std(ddof=1)
    v_c, v_p = s_c**2 / len(clean), s_p**2 / len(poisoned)
    se = math.sqrt(v_c + v_p)
    t = (m_p - m_c) / se if se > 0 else math.nan
    df = (v_c + v_p) ** 2 / (v_c**2 / (len(clean) - 1) + v_p**2 / (len(poisoned) - 1)) if se > 0 else math.nan
    # Benjamini-Hochberg over every poisoned condition of this algorithm, as the report does
    conditions = [(a, None if (isinstance(b, float) and math.isnan(b)) else b)
                  for a, b in ours.loc[ours.attack != "none", ["attack", "budget"]].drop_duplicates().itertuples(index=False)]
    pvalues = [welch_less(rows(a, b), clean) for a, b in conditions]
    reject, adjusted = benjamini_hochberg(pvalues, alpha)
    mine = next(i for i, (a, b) in enumerate(conditions) if a == attack and (b == budget or (b is None and budget is None)))
    random_mean = random.mean() if len(random) else math.nan
    return {
        "clean accuracies (%)": clean.round(2).tolist(), "poisoned accuracies (%)": poisoned.round(2).tolist(),
        "clean mean": m_c, "clean std": s_c, "poisoned mean": m_p, "poisoned std": s_p,
        "standard error": se, "Welch t": t, "Welch df": df, "one-sided p": pvalues[mine],
        "cells in the BH family": len(pvalues), "rank of this p": int(1 + sum(p < pvalues[mine] for p in pvalues if np.isfinite(p))),
        "BH-adjusted p": float(adjusted[mine]), "significant drop": bool(reject[mine]),
        "random mean": random_mean, "dImp": delta_improvement(m_p, random_mean),
    }
