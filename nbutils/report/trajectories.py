"""Search trajectories: the cell a supernet search would return after each of its epochs.

DARTS and P-DARTS derive a genotype from alpha after every epoch and keep it in the search's
history (``result.json``). Laid out as one row per trial and epoch (``outputs/epochs.csv``,
:func:`epochs_csv`) and drawn as the normal cell's composition per epoch
(:func:`trajectory_figure`), they show when a search leaves its early phase. While the
operations' weights are barely trained, the parameter-free operations lower the loss fastest,
so alpha first drifts towards pooling (and anti-search towards convolutions); once the weights
have trained, DARTS moves to convolutions and anti-search to pooling, as in the workshop
paper's Figure 1. A search that ends before that turn reports the early phase, not the method.

The figure costs no compute: it reads the histories the searches already wrote.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..core.store import read_json
from ..space.genotype import Genotype
from .figures import EDGE_COLOURS
from .names import LABEL_FLIPS, algorithm_name, trial_condition
from .results import RESULT_FILE, study_of

#: the columns of outputs/epochs.csv (defined in outputs/README.md)
EPOCHS_CSV_COLUMNS = ["study", "dataset", "algorithm", "attack", "budget", "trial", "epoch",
                      "normal_conv", "normal_pool", "normal_skip", "reduce_conv", "reduce_pool", "reduce_skip",
                      "train_acc", "val_acc", "weight_steps", "arch_steps"]
KINDS = ("conv", "pool", "skip")


def epochs_csv(results: pd.DataFrame) -> pd.DataFrame:
    """One row per search trial and epoch (:data:`EPOCHS_CSV_COLUMNS`) for every trial of
    ``results`` (:func:`nbutils.report.results.load_results`) whose search recorded a genotype
    per epoch (DARTS, its anti-search, P-DARTS, whose epochs run on across its stages); the
    other algorithms and random sampling have no epochs and no rows. ``val_acc`` is empty in
    the weight-only warm-up epochs, which take no architecture step. ``weight_steps`` and
    ``arch_steps`` count the steps up to the end of the epoch (empty for searches run before
    the history recorded them)."""
    rows, seen = [], set()
    for trial in results.itertuples():
        if trial.algorithm == "random" or (trial.search, trial.dataset) in seen:
            continue
        seen.add((trial.search, trial.dataset))
        path = Path(trial.search) / RESULT_FILE
        history = read_json(path).get("history", []) if path.exists() else []
        steps = {"weight_steps": 0, "arch_steps": 0}
        for epoch in history:
            if "genotype" not in epoch or "epoch" not in epoch:
                continue
            genotype = Genotype.from_dict(epoch["genotype"])
            counts = {f"{cell}_{kind}": n for cell in ("normal", "reduce") for kind, n in genotype.counts(cell).items()}
            for name in steps:
                steps[name] = steps[name] + epoch[name] if name in epoch and steps[name] is not None else None
            rows.append({"study": study_of(trial), "dataset": trial.dataset, "algorithm": trial.algorithm,
                         "attack": trial.attack, "budget": trial.budget, "trial": trial.trial, "epoch": epoch["epoch"],
                         **counts, "train_acc": epoch.get("train_acc"), "val_acc": epoch.get("val_acc"), **steps})
    return pd.DataFrame(rows, columns=EPOCHS_CSV_COLUMNS)


def first_architecture_epoch(epochs: pd.DataFrame) -> int | None:
    """The first epoch with an architecture step (a validation accuracy), or None if none had one."""
    with_alpha = epochs.loc[epochs.val_acc.notna(), "epoch"]
    return int(with_alpha.min()) if len(with_alpha) else None


def settled_epoch(epochs: pd.DataFrame, kind: str = "conv") -> int | None:
    """The first epoch from which the mean count of ``kind`` in the normal cell stays within
    one operation of its final value; None without epochs. A coarse, readable summary of when
    the search stopped changing its mind. Only epochs with architecture steps count: in the
    weight-only warm-up the cell is alpha's initial one, whatever it resembles."""
    start = first_architecture_epoch(epochs)
    epochs = epochs if start is None else epochs[epochs.epoch >= start]
    if epochs.empty:
        return None
    mean = epochs.groupby("epoch")[f"normal_{kind}"].mean().sort_index()
    near = (mean - mean.iloc[-1]).abs() <= 1.0
    settled = mean.index[-1]
    for epoch, ok in zip(mean.index[::-1], near[::-1]):
        if not ok:
            break
        settled = epoch
    return int(settled)


def _conditions(epochs: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    keys = ["study", "dataset", "algorithm", "attack", "budget"]
    frame = epochs.assign(budget=epochs.budget.astype(object).where(epochs.budget.notna(), None))
    return list(frame.groupby(keys, sort=False, dropna=False))


def trajectory_figure(epochs: pd.DataFrame, columns: int = 3) -> Figure | None:
    """The normal cell's convolutions, pools and skip connections after each search epoch, one
    panel per condition: each trial a faint line, their mean a bold one; the weight-only warm-up
    shaded. None without epochs."""
    if epochs.empty:
        return None
    conditions = _conditions(epochs)
    columns = min(columns, len(conditions))
    rows = math.ceil(len(conditions) / columns)
    fig = Figure(figsize=(3.6 * columns, 2.7 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, sharey=True, squeeze=False)).ravel()
    for ax, ((study, dataset, algorithm, attack, budget), frame) in zip(axes, conditions):
        start = first_architecture_epoch(frame)
        if start is not None and start > 1:
            ax.axvspan(0.5, start - 0.5, color="0.92", zorder=0)
        for kind in KINDS:
            column = f"normal_{kind}"
            for _, trial in frame.groupby("trial"):
                ax.plot(trial.epoch, trial[column], color=EDGE_COLOURS[kind], alpha=0.25, linewidth=0.8)
            mean = frame.groupby("epoch")[column].mean()
            ax.plot(mean.index, mean.values, color=EDGE_COLOURS[kind], linewidth=2.2, label=kind)
        row = pd.Series({"algorithm": algorithm, "attack": attack, "budget": budget,
                         "study": "ood" if study.startswith("ood:") else study,
                         "search_dataset": study.removeprefix("ood:")})
        title = f"{algorithm_name(algorithm)}, {trial_condition(row)}"
        ax.set_title(title + (f" ({dataset})" if epochs.dataset.nunique() > 1 else ""), fontsize=9)
        ax.set_xlabel("search epoch", fontsize=8)
        ax.set_ylim(-0.3, 8.3)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes[len(conditions):]:
        ax.set_visible(False)
    axes[0].set_ylabel("operations in the normal cell", fontsize=8)
    axes[0].legend(fontsize=8, loc="upper left")
    return fig


def last_epoch_cells(epochs: pd.DataFrame) -> pd.DataFrame:
    """Per condition of the main study: the trials, the steps of a search, and the mean normal
    cell at the last epoch (conv, pool, skip): the figures the report's findings quote."""
    rows = []
    for (study, dataset, algorithm, attack, budget), frame in _conditions(epochs[epochs.study == "main"]):
        last = frame[frame.epoch == frame.epoch.max()]
        rows.append({"dataset": dataset, "algorithm": algorithm, "attack": attack, "budget": budget,
                     "trials": frame.trial.nunique(), "epochs": int(frame.epoch.max()),
                     "weight_steps": last.weight_steps.max(), "arch_steps": last.arch_steps.max(),
                     "first_arch_epoch": first_architecture_epoch(frame),
                     "conv_settled": settled_epoch(frame, "conv"),
                     **{kind: last[f"normal_{kind}"].mean() for kind in KINDS}})
    return pd.DataFrame(rows)


def regime_sentences(epochs: pd.DataFrame) -> list[str]:
    """One sentence per searched condition of the main study: how long its searches were, in
    steps, and the normal cell they ended with (mean over trials at the last epoch)."""
    sentences = []
    several = epochs.dataset.nunique() > 1
    for row in last_epoch_cells(epochs).itertuples():
        condition = trial_condition(pd.Series({"algorithm": row.algorithm, "attack": row.attack, "budget": row.budget,
                                               "study": "main"}))
        steps = ("" if pd.isna(row.weight_steps) else
                 f"{int(row.weight_steps)} weight steps, {int(row.arch_steps)} of them with an architecture step "
                 f"(from epoch {row.first_arch_epoch}), in ")
        sentences.append(
            f"{algorithm_name(row.algorithm)}, {condition}{f' ({row.dataset})' if several else ''}: {steps}"
            f"{row.epochs} epochs; at the last epoch the normal cell holds {row.conv:.1f} convolutions, "
            f"{row.pool:.1f} pools and {row.skip:.1f} skip connections (mean of {row.trials} trials), and the "
            f"mean convolution count was within one of that from epoch {row.conv_settled} on.")
    return sentences


def memorisation_sentences(epochs: pd.DataFrame) -> list[str]:
    """For each label-flipping condition of the main study: whether its searches memorised the
    flipped labels, the condition of the workshop paper's skip-connection collapse under RLF
    (its Figure 2: DARTS then keeps skip connections, which add no error on contradictory
    labels). A supernet that has memorised them fits its training batches beyond the clean
    share ``1 - budget``; one that has not cannot show the collapse, whatever its trials find."""
    sentences = []
    main = epochs[(epochs.study == "main") & epochs.attack.isin(LABEL_FLIPS)]
    for (_, dataset, algorithm, attack, budget), frame in _conditions(main):
        last = frame[frame.epoch == frame.epoch.max()]
        accuracy, clean_share = last.train_acc.mean(), 1.0 - float(budget)
        row = pd.Series({"algorithm": algorithm, "attack": attack, "budget": budget, "study": "main"})
        name = f"{algorithm_name(algorithm)} under {trial_condition(row)}"
        if accuracy > clean_share:
            verdict = (f"above the {clean_share:.2f} of correctly labelled images, so the supernet had begun to "
                       "memorise the flipped labels, the condition of the workshop paper's skip-connection collapse")
        else:
            verdict = (f"at most the {clean_share:.2f} of correctly labelled images: the supernet had not begun to "
                       "memorise the flipped labels, which the workshop paper's skip-connection collapse (its "
                       "Figure 2) follows from, so this run cannot show that collapse; the `workshop` preset "
                       "searches as the paper did (50 epochs on CIFAR-10)")
        sentences.append(f"{name}: the supernets' training accuracy at the last epoch was {accuracy:.2f}, {verdict}; "
                         f"their normal cells ended with {last.normal_skip.mean():.1f} skip connections on average.")
    return sentences
