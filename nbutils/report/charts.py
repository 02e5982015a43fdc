"""The report's charts of measured numbers (matplotlib ``Figure`` objects, no pyplot state):
accuracy against the poisoning budget (:func:`budget_figure`), every trial (:func:`trials_figure`),
NSGANetV2's Pareto front (:func:`pareto_figure`); :func:`figure_image` shows any of them in a
notebook.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Image
from matplotlib.figure import Figure

from ..nas.search_result import SearchResult
from .names import algorithm_name, attack_name, trial_condition


def budget_figure(table: pd.DataFrame, algorithm: str = "darts"):
    """Workshop Figure 3: accuracy against the poisoning budget, one line per attack, error
    bars one standard deviation over trials, the clean accuracy at budget 0; None without data."""
    rows = table[table.algorithm == algorithm]
    clean = rows[rows.attack == "none"]
    attacks = [a for a in dict.fromkeys(rows.attack) if a != "none"]
    if clean.empty or not attacks:
        return None
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    c = clean.iloc[0]
    for attack in attacks:
        points = rows[rows.attack == attack].sort_values("budget")
        x = [0.0] + [100 * b for b in points.budget]
        y = [c.acc_mean] + list(points.acc_mean)
        err = [0 if math.isnan(c.acc_std) else c.acc_std] + [0 if math.isnan(s) else s for s in points.acc_std]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=attack_name(attack))
    ax.set_xlabel("poisoning budget p (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{algorithm_name(algorithm)}: accuracy of the retrained architecture vs budget")
    ax.legend(fontsize=8)
    return fig


def figure_image(figure):
    """A matplotlib figure as a PNG for ``display``: shown the same whether or not the kernel's
    inline backend is active yet (a bare ``Figure`` displays as its text repr until pyplot has
    drawn once)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return Image(data=buffer.getvalue(), format="png")


def trials_figure(results: pd.DataFrame):
    """Every trial's accuracy, one row per condition (the labels read horizontally, however many
    conditions there are), a colour per NAS algorithm; None without trials."""
    if results.empty:
        return None
    frame = results.assign(condition=[trial_condition(r) for r in results.itertuples()],
                           NAS=[algorithm_name(a) for a in results.algorithm])
    rows = frame.condition.nunique()
    fig = Figure(figsize=(8, 1.0 + 0.32 * rows * max(1, frame.NAS.nunique() ** 0.5)), layout="constrained")
    ax = fig.subplots()
    sns.stripplot(data=frame, y="condition", x="acc", hue="NAS", dodge=True, size=6, jitter=False, ax=ax)
    ax.set_xlabel("test accuracy of the retrained architecture (%)")
    ax.set_ylabel("")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Every trial")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return fig


def pareto_figure(found: SearchResult | Sequence[dict] | np.ndarray, *, title: str | None = None):
    """Validation error against cost: every measured architecture, the Pareto front, the four
    best and the one retrained. ``found`` is a :class:`SearchResult` of :func:`~nbutils.nas.nsganetv2.nsganetv2_search`,
    or a front alone: records with ``val_acc`` (or ``error``) and ``cost``, or an n x 2 array of
    (error, cost). Returns a matplotlib ``Figure``."""
    archive = four = chosen = None
    if isinstance(found, SearchResult):
        if "archive_error" not in found.arrays or not found.stages:
            raise ValueError("found must be the SearchResult of nsganetv2_search (with its archive and stage)")
        error, cost = found.arrays["archive_error"], found.arrays["archive_cost"]
        archive = np.column_stack([error, cost])
        front = archive[found.arrays["pareto_indices"]]
        four = archive[found.arrays["four_best"]]
        chosen = archive[found.stages[0]["chosen"]]
    elif isinstance(found, np.ndarray):
        if found.ndim != 2 or found.shape[1] != 2:
            raise ValueError(f"a front array must be n x 2 (error, cost), got shape {found.shape}")
        front = found.astype(float)
    else:
        rows = list(found)
        try:
            front = np.array([[r["error"] if "error" in r else 1.0 - r["val_acc"], r["cost"]] for r in rows], dtype=float)
        except (KeyError, TypeError) as err:
            raise ValueError("front records need 'val_acc' (or 'error') and 'cost'") from err
    if len(front) == 0:
        raise ValueError("the front is empty")
    front = front[np.argsort(front[:, 1], kind="stable")]

    figure = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = figure.add_subplot()
    if archive is not None:
        ax.scatter(archive[:, 1], 100 * archive[:, 0], s=12, color="0.75", label="measured")
    ax.step(front[:, 1], 100 * front[:, 0], where="post", color="tab:blue", linewidth=1)
    ax.scatter(front[:, 1], 100 * front[:, 0], s=24, color="tab:blue", label="Pareto front", zorder=3)
    if four is not None:
        ax.scatter(four[:, 1], 100 * four[:, 0], s=90, facecolors="none", edgecolors="tab:orange", linewidths=1.5,
                   label="four best", zorder=4)
    if chosen is not None:
        ax.scatter([chosen[1]], [100 * chosen[0]], s=160, marker="*", color="tab:red", label="retrained", zorder=5)
    ax.set_xlabel("cost")
    if isinstance(found, SearchResult):
        ax.set_xlabel({"params": "parameters of the retrained network", "macs": "multiply-accumulates"}.get(
            found.stages[0].get("cost"), "cost"))
    ax.set_ylabel("validation error on the search data (%)")
    ax.legend(frameon=False, fontsize="small")
    if title:
        ax.set_title(title)
    return figure
