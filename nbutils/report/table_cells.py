"""The tables' cells: per NAS algorithm and condition, the trials summarised and tested
(:func:`results_table`): Acc (mean +- std over trials), dImp against the random-sampling mean,
and the one-sided Welch test against the clean condition with Benjamini-Hochberg correction
over the algorithm's p-values; every study's cells as ``outputs/cells.csv`` (:func:`cells_csv`);
and what they found, in words (:func:`findings`).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..nas import registry
from .names import algorithm_name, condition_label
from .results import no_budget
from .stats import CellSummary, benjamini_hochberg, delta_improvement, detectable_drop, dimp_interval, welch_less


def condition_rows(frame: pd.DataFrame, attack: str, budget) -> pd.Series:
    """Which rows of ``frame`` (trials or cells) hold the condition ``attack`` at ``budget``."""
    same_budget = frame.budget.isna() if no_budget(budget) else frame.budget == budget
    return (frame.attack == attack) & same_budget


#: :func:`results_table`'s columns
TABLE_COLUMNS = ["algorithm", "dataset", "anchor", "attack", "budget", "condition", "n", "acc_mean", "acc_std", "dimp", "dimp_low",
                 "dimp_high", "p", "p_bh", "significant", "detectable_drop", "cpu_hours"]


#: a search tested against another's clean trials (its own family): anti-search, the workshop
#: paper's Table 1, finds worse cells than the DARTS search it inverts
TESTED_AGAINST = registry.TESTED_AGAINST


def results_table(results: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per algorithm and condition: n, Acc mean/std, dImp, p-value, BH-adjusted p, significant.
    Each poisoned condition is tested below its algorithm's clean one; an algorithm of
    :data:`TESTED_AGAINST` (run on clean data only) below the other algorithm's clean trials."""
    random_acc = results.loc[results.algorithm == "random", "acc"]
    rows = []
    for algorithm, group in results[results.algorithm != "random"].groupby("algorithm", sort=False):
        clean = group.loc[group.attack == "none", "acc"].to_numpy()
        if algorithm in TESTED_AGAINST:
            reference = results.loc[(results.algorithm == TESTED_AGAINST[algorithm]) & (results.attack == "none"), "acc"]
            rows += _with_bh([_cell_row(algorithm, "none", None, group, reference.to_numpy(), random_acc, alpha,
                                        tested=len(reference) > 0)], alpha)
            continue
        conditions = group[["attack", "budget"]].drop_duplicates().itertuples(index=False)
        algorithm_rows = []
        for attack, budget in conditions:
            budget = None if no_budget(budget) else budget
            algorithm_rows.append(_cell_row(algorithm, attack, budget, group.loc[condition_rows(group, attack, budget)],
                                            clean, random_acc, alpha, tested=attack != "none"))
        rows += _with_bh(algorithm_rows, alpha)
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


#: the columns of outputs/cells.csv (documented in outputs/README.md)
CELLS_CSV_COLUMNS = ["study", "dataset", "algorithm", "attack", "budget", "n", "acc_mean", "acc_std", "dimp",
                     "dimp_low", "dimp_high", "p", "p_bh", "significant", "detectable_drop", "cpu_hours"]


def cells_csv(results: pd.DataFrame, dataset: str | None = None, alpha: float = 0.05) -> pd.DataFrame:
    """One row per table cell of every study (:data:`CELLS_CSV_COLUMNS`), as the report's
    tables show them, for the trials retrained on ``dataset`` (None: for each dataset of
    ``results.dataset`` in turn, so each cell is tested against the clean trials and random
    samples of its own dataset). ``p`` is one-sided Welch, BH-adjusted in ``p_bh`` within its family:
    main and no_augment, the cell below its study's clean condition (family: the algorithm's
    cells of that study); ood:<dataset>, below the algorithm's clean main-study trials
    (family: the algorithm's out-of-distribution cells); defense:<name>, the undefended
    poisoned cell below the defended one, so a small p means the defence helps (family: every
    defended cell)."""
    if dataset is None:
        if results.dataset.isna().any():
            raise ValueError("every trial needs its dataset (results.dataset), or pass dataset=")
        parts = [cells_csv(part, name, alpha) for name, part in results.groupby("dataset", sort=False)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=CELLS_CSV_COLUMNS)
    random_acc = results.loc[results.algorithm == "random", "acc"]
    random_rows = results[results.algorithm == "random"]
    frames = []
    for study in ("main", "no_augment"):
        rows = results[results.study == study]
        if len(rows):
            frames.append(results_table(pd.concat([random_rows, rows[rows.algorithm != "random"]]), alpha)
                          .assign(study=study))
    ood = results[results.study == "ood"]
    ood_rows = []
    for algorithm, group in ood.groupby("algorithm", sort=False):
        clean = results[(results.study == "main") & (results.algorithm == algorithm) & (results.attack == "none")]
        family = [_cell_row(algorithm, "none", None, g, clean.acc.to_numpy(), random_acc, alpha)
                  | {"study": f"ood:{source}"} for source, g in group.groupby("search_dataset", sort=False)]
        ood_rows += _with_bh(family, alpha)
    defended = results[results.study.str.startswith("defense:")]
    defense_rows = []
    for (study, attack, budget, algorithm), group in defended.groupby(["study", "attack", "budget", "algorithm"],
                                                                       sort=False):
        poisoned = results[(results.study == "main") & (results.algorithm == algorithm)
                           & condition_rows(results, attack, budget)]
        row = _cell_row(algorithm, attack, budget, group, poisoned.acc.to_numpy(), random_acc, alpha)
        row["p"] = welch_less(poisoned.acc.to_numpy(), group.acc.to_numpy())
        defense_rows.append(row | {"study": study})
    extra = [pd.DataFrame(rows) for rows in (ood_rows, _with_bh(defense_rows, alpha)) if rows]
    table = pd.concat(frames + extra, ignore_index=True) if frames or extra else pd.DataFrame(columns=CELLS_CSV_COLUMNS)
    return table.assign(dataset=dataset)[CELLS_CSV_COLUMNS]


def _with_bh(rows: list[dict], alpha: float) -> list[dict]:
    reject, adjusted = benjamini_hochberg([r["p"] for r in rows], alpha)
    return [r | {"p_bh": adj, "significant": bool(rej)} for r, rej, adj in zip(rows, reject, adjusted)]


def _cell_row(algorithm: str, attack: str, budget, rows_here: pd.DataFrame, reference: np.ndarray,
              random_acc: pd.Series, alpha: float, tested: bool = True) -> dict:
    """One cell: its trials ``rows_here``, tested one-sided below ``reference`` when ``tested``
    (not the reference itself), dImp against ``random_acc``, the drop its trials could detect."""
    accs = rows_here["acc"].to_numpy()
    summary = CellSummary.of(accs)
    low, high = dimp_interval(accs, random_acc)
    spread = CellSummary.of(np.concatenate([accs - accs.mean(), reference - reference.mean()])).std \
        if len(reference) and len(accs) else math.nan
    return {
        "algorithm": algorithm, "attack": attack, "budget": budget, "condition": condition_label(attack, budget),
        "dataset": rows_here["dataset"].iloc[0] if "dataset" in rows_here and len(rows_here) else None,
        # where the cell's trials are listed (:func:`~nbutils.report.tables.trials_html`)
        "anchor": rows_here["anchor"].iloc[0] if "anchor" in rows_here and len(rows_here) else None,
        "n": summary.n, "acc_mean": summary.mean, "acc_std": summary.std,
        "dimp": delta_improvement(summary.mean, CellSummary.of(random_acc).mean), "dimp_low": low, "dimp_high": high,
        "p": welch_less(accs, reference) if tested else math.nan,
        "detectable_drop": detectable_drop(spread, len(accs), len(reference), alpha) if tested else math.nan,
        "cpu_hours": float((rows_here["search_seconds"].fillna(0) + rows_here["retrain_seconds"].fillna(0)).sum()) / 3600,
    }


def _effect(row) -> str:
    """What a tested cell asks, in the papers' words."""
    if row.algorithm in TESTED_AGAINST:
        return (f"{algorithm_name(row.algorithm)} finds worse cells than "
                f"{algorithm_name(TESTED_AGAINST[row.algorithm])} (workshop Table 1)")
    paper = "workshop Table 2" if row.algorithm == "darts" else "TMLR Table 1"
    return (f"{condition_label(row.attack, row.budget)} lowers the accuracy of "
            f"{algorithm_name(row.algorithm)}'s architectures ({paper})")


def findings(table: pd.DataFrame) -> list[str]:
    """One plain sentence per clean cell of a :func:`results_table` on whether it beats random
    sampling (dImp's 95% confidence interval above 0), then one per tested cell: whether this run
    found the papers' effect (a significant drop), and if not, how large a drop its trials could
    have detected, or that they point the other way."""
    reference_means = {r.algorithm: r.acc_mean for r in table[table.attack == "none"].itertuples()}
    sentences = []
    for row in table[(table.attack == "none") & ~table.algorithm.isin(list(TESTED_AGAINST))].itertuples():
        if math.isnan(row.dimp_low):
            continue
        verdict = ("**Beats random sampling**" if row.dimp_low > 0 else
                   "**Below random sampling**" if row.dimp_high < 0 else "**Not distinguishable from random sampling**")
        sentences.append(f"{verdict}: {algorithm_name(row.algorithm)} on clean data, dImp {row.dimp:+.2f} pp "
                         f"(95% CI [{row.dimp_low:+.2f}, {row.dimp_high:+.2f}], n={row.n}).")
    for row in table[table.p.notna()].itertuples():
        reference = reference_means[TESTED_AGAINST.get(row.algorithm, row.algorithm)]
        change = row.acc_mean - reference
        numbers = f"{row.acc_mean:.2f}% against {reference:.2f}% ({change:+.2f} pp, n={row.n}, p={row.p:.2g}"
        if row.significant:
            sentences.append(f"**Found**: {_effect(row)}: {numbers}, BH-adjusted {row.p_bh:.2g}).")
        elif change >= 0:
            sentences.append(f"**Not found, the opposite direction**: {_effect(row)}: {numbers}).")
        else:
            sentences.append(f"**Not found**: {_effect(row)}: {numbers}); the trials would have detected a drop "
                             f"of {row.detectable_drop:.2f} pp with probability 0.8.")
    return sentences
