"""The report's content, computed from artifacts only (the report never trains).

``load_results`` gathers one row per retrained architecture; ``results_table`` turns them
into the papers' table: per NAS algorithm and condition, Acc (mean +- std over trials),
dImp against the random-sampling mean, and the one-sided Welch test against the clean
condition with Benjamini-Hochberg correction over the algorithm's p-values.

Links: every accuracy in a table links to its trials in the "Every architecture" listing
(:func:`trials_html`), where each trial's accuracy links to the executed notebook of its
retraining and of its search, and to their artifact folders. Links are relative to the
outputs folder, where the runner puts ``report.html``.
"""
from __future__ import annotations

import html
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..nas import registry
from ..space.genotype import Genotype
from .stats import CellSummary, benjamini_hochberg, delta_improvement, detectable_drop, dimp_interval, welch_less
from ..core.store import read_json

RESULT_FILE = "result.json"


def grid_datasets(settings: dict) -> list[dict]:
    """grid.yaml's ``data`` as a list (one mapping, or several): the primary dataset first."""
    data = settings["grid"]["data"]
    return list(data) if isinstance(data, list) else [data]


def load_results(spec: dict, inputs: dict[str, str]) -> pd.DataFrame:
    """One row per retrained architecture: algorithm, attack, budget, trial, acc (percent),
    genotype, and ``dataset``, the dataset it was retrained and tested on."""
    primary = grid_datasets(spec["settings"])[0]["dataset"] if "settings" in spec else None
    rows = []
    for cell in spec["cells"]:
        artifact = Path(inputs[cell["role"]])
        result = read_json(artifact / RESULT_FILE)
        record = read_json(artifact / "spec.json")
        search = artifact.parent.parent / "search" / record["inputs"]["search"]["key"]
        search_record = read_json(search / "spec.json") if (search / "spec.json").exists() else {}
        rows.append({
            "algorithm": cell["algorithm"], "attack": cell["attack"], "budget": cell["budget"],
            "trial": cell["trial"], "acc": 100.0 * result["test_acc"], "study": cell.get("study", "main"),
            "search_dataset": cell.get("search_dataset"), "dataset": cell.get("dataset", primary),
            "genotype": Genotype.from_dict(result["genotype"]), "parameters": result["parameters"],
            "search_seconds": search_record.get("seconds", math.nan),
            "retrain_seconds": record.get("seconds", math.nan), "artifact": str(artifact), "search": str(search),
            "seed": record.get("spec", {}).get("seed"),
            "anchor": trials_anchor(cell["algorithm"], cell["attack"], cell["budget"], cell.get("study", "main"),
                                    cell.get("search_dataset"), cell.get("dataset", primary)),
        })
    columns = ["algorithm", "attack", "budget", "trial", "acc", "study", "search_dataset", "dataset", "genotype",
               "parameters", "search_seconds", "retrain_seconds", "artifact", "search", "anchor", "seed"]
    return pd.DataFrame(rows, columns=columns)


def trials_anchor(algorithm: str, attack: str, budget, study: str = "main", search_dataset: str | None = None,
                  dataset: str | None = None) -> str:
    """The HTML id of one cell's trials in the listing (:func:`trials_html`); ``dataset``: the
    dataset the trials were retrained on."""
    parts = [study, algorithm, attack, "" if no_budget(budget) else f"{100 * budget:g}", search_dataset or "",
             dataset or ""]
    return "trials-" + re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def artifact_href(folder: str | Path, file: str = "notebook.ipynb") -> str:
    """A stage folder ``<outputs>/<kind>/<key>`` (or a file in it) relative to the outputs folder."""
    folder = Path(folder)
    return f"{folder.parent.name}/{folder.name}/{file}".rstrip("/")


def _linked(text: str, href: str, title: str = "") -> str:
    title = f' title="{html.escape(title)}"' if title else ""
    return f'<a href="{html.escape(href)}"{title}>{text}</a>'


def no_budget(budget) -> bool:
    """Whether a budget cell is empty (None, or NaN once pandas has stored it as a float)."""
    return budget is None or (isinstance(budget, float) and math.isnan(budget))


ATTACK_NAMES = {"none": "None", "rlf": "RLF", "clf": "CLF", "gaussian": "Noise", "gc": "GC"}
ALGORITHM_NAMES = {**{name: a.display_name for name, a in registry.ALGORITHMS.items()}, "random": "Random"}


def attack_name(attack: str) -> str:
    """How the papers name a condition's attack (the alpha attack: the workshop paper's, with e)."""
    if attack.startswith("alpha-e"):
        return f"α-gradient (e={attack[len('alpha-e'):]})"
    return ATTACK_NAMES.get(attack, attack.upper())


def algorithm_name(algorithm: str) -> str:
    return ALGORITHM_NAMES.get(algorithm, algorithm)


def condition_label(attack: str, budget: float | None) -> str:
    return "None" if attack == "none" else f"{attack_name(attack)} {100 * budget:g}%"


def _rows_of(frame: pd.DataFrame, attack: str, budget) -> pd.Series:
    same_budget = frame.budget.isna() if no_budget(budget) else frame.budget == budget
    return (frame.attack == attack) & same_budget


TABLE_COLUMNS = ["algorithm", "dataset", "anchor", "attack", "budget", "condition", "n", "acc_mean", "acc_std", "dimp", "dimp_low",
                 "dimp_high", "p", "p_bh", "significant", "detectable_drop", "cpu_hours"]


#: a search tested against another's clean trials (its own family): anti-search, the workshop
#: paper's Table 1, finds worse cells than the DARTS search it inverts
TESTED_AGAINST = {"darts_anti": "darts"}


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
            algorithm_rows.append(_cell_row(algorithm, attack, budget, group.loc[_rows_of(group, attack, budget)],
                                            clean, random_acc, alpha, tested=attack != "none"))
        rows += _with_bh(algorithm_rows, alpha)
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


# --- results as data: outputs/trials.csv and outputs/cells.csv (documented in outputs/README.md) ---
TRIALS_CSV_COLUMNS = ["study", "dataset", "search_dataset", "algorithm", "attack", "budget", "trial", "seed", "acc",
                      "parameters", "search_seconds", "retrain_seconds", "genotype", "retrain_artifact",
                      "search_artifact"]
CELLS_CSV_COLUMNS = ["study", "dataset", "algorithm", "attack", "budget", "n", "acc_mean", "acc_std", "dimp",
                     "dimp_low", "dimp_high", "p", "p_bh", "significant", "detectable_drop", "cpu_hours"]


def study_of(row) -> str:
    """The study a trial belongs to as the CSV files name it: main, no_augment, defense:<name>,
    or ood:<search dataset> (each out-of-distribution dataset is a study of its own)."""
    return f"ood:{row.search_dataset}" if row.study == "ood" else row.study


def trials_csv(results: pd.DataFrame, dataset: str | None = None) -> pd.DataFrame:
    """One row per retrained architecture (:data:`TRIALS_CSV_COLUMNS`); artifact folders relative
    to the outputs folder, the genotype as :meth:`Genotype.to_json`. ``dataset``: the one all
    were retrained on; None: each row's own (``results.dataset``)."""
    datasets = [dataset] * len(results) if dataset is not None else list(results.dataset)
    frame = pd.DataFrame({
        "study": [study_of(r) for r in results.itertuples()],
        "dataset": datasets,
        "search_dataset": [None if r.algorithm == "random" else r.search_dataset if r.study == "ood" else d
                           for r, d in zip(results.itertuples(), datasets)],
        "algorithm": results.algorithm, "attack": results.attack, "budget": results.budget,
        "trial": results.trial, "seed": results.seed, "acc": results.acc, "parameters": results.parameters,
        "search_seconds": results.search_seconds, "retrain_seconds": results.retrain_seconds,
        "genotype": [g.to_json() for g in results.genotype],
        "retrain_artifact": [artifact_href(a, "") for a in results.artifact],
        "search_artifact": [artifact_href(a, "") for a in results.search],
    })
    return frame[TRIALS_CSV_COLUMNS]


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
        poisoned = results[(results.study == "main") & (results.algorithm == algorithm) & _rows_of(results, attack, budget)]
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
        # where the cell's trials are listed (:func:`trials_html`)
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


def details_table(table: pd.DataFrame) -> pd.DataFrame:
    """Beyond the papers, one row per cell: dImp with its 95% confidence interval, the p-values,
    the smallest drop the cell's trials could detect (one-sided, power 0.8) and its compute cost."""
    def interval(r) -> str:
        return "-" if math.isnan(r.dimp_low) else f"[{r.dimp_low:.2f}, {r.dimp_high:.2f}]"

    return pd.DataFrame({
        "NAS": [algorithm_name(a) for a in table.algorithm],
        "condition": [_linked(html.escape(r.condition), "#" + r.anchor) for r in table.itertuples()],
        "n": table.n,
        "Acc.": [_fmt(m, s) for m, s in zip(table.acc_mean, table.acc_std)],
        "ΔImp.": table.dimp.round(2),
        "ΔImp. 95% CI": [interval(r) for r in table.itertuples()],
        "p (Welch)": table.p.map(lambda v: "-" if math.isnan(v) else f"{v:.3g}"),
        "p (BH)": table.p_bh.map(lambda v: "-" if math.isnan(v) else f"{v:.3g}"),
        "detectable drop (pp)": table.detectable_drop.map(lambda v: "-" if math.isnan(v) else f"{v:.2f}"),
        "CPU hours": table.cpu_hours.round(3),
    })


def trials_html(results: pd.DataFrame) -> str:
    """Every retrained architecture, one row per trial, grouped by cell (each group's first row
    carries the anchor the tables link to): its accuracy links to the executed retraining
    notebook, "search" to the executed search notebook, and the folder links to the artifacts."""
    body = []
    several = "dataset" in results and results.dataset.nunique() > 1
    for anchor, group in results.groupby("anchor", sort=False):
        for i, r in enumerate(group.itertuples()):
            row_id = f' id="{anchor}"' if i == 0 else ""
            condition = trial_condition(r) + (f", on {r.dataset}" if several else "")
            body.append(
                f"<tr{row_id}><td>{html.escape(algorithm_name(r.algorithm))}</td><td>{html.escape(condition)}</td>"
                f"<td>{r.trial + 1}</td><td>{_linked(f'{r.acc:.2f}', artifact_href(r.artifact), 'executed retraining notebook')}</td>"
                f"<td>{r.parameters:,}</td><td>{html.escape(r.genotype.summary())}</td>"
                f"<td>{_linked('search', artifact_href(r.search), 'executed search notebook')} · "
                f"{_linked('folders', artifact_href(r.artifact, ''), 'retraining artifact')}"
                f"/{_linked('…', artifact_href(r.search, ''), 'search artifact')}</td></tr>")
    return ('<table class="nas-table"><caption>Every architecture: one row per trial. The accuracy opens the '
            "executed retraining notebook, “search” the executed search notebook.</caption>"
            "<thead><tr><th>NAS</th><th>Condition</th><th>Trial</th><th>Acc. (%)</th><th>Parameters</th>"
            "<th>Cells</th><th>Notebooks</th></tr></thead><tbody>" + "".join(body) + "</tbody></table>")


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if not math.isnan(std) else f"{mean:.2f}"


def not_run_reason(algorithm: str, attack: str) -> str:
    if algorithm in registry.names(label_free=True) and attack in ("rlf", "clf"):
        return f"{algorithm_name(algorithm)} never reads labels: label flipping cannot change its search"
    return "not in this run's grid, or its trials did not finish"


def table_html(table: pd.DataFrame, random_acc: CellSummary, caption: str = "") -> str:
    """The papers' table layout: conditions as rows, (Acc., dImp.) per NAS algorithm as columns;
    statistically significant drops bold and underlined."""
    algorithms = list(dict.fromkeys(table.algorithm))
    conditions = list(dict.fromkeys((a, None if no_budget(b) else b) for a, b in zip(table.attack, table.budget)))
    head = "".join(f'<th colspan="2">{html.escape(algorithm_name(a))}</th>' for a in algorithms)
    sub = "".join("<th>Acc.</th><th>ΔImp.</th>" for _ in algorithms)
    body = []
    for attack, budget in conditions:
        label = attack_name(attack)
        cells = [f"<td>{html.escape(label)}</td><td>{'–' if budget is None else f'{100 * budget:g}%'}</td>"]
        for a in algorithms:
            match = table[(table.algorithm == a) & _rows_of(table, attack, budget)]
            if match.empty:
                why = not_run_reason(a, attack)
                cells.append(f'<td title="{html.escape(why)}">-</td><td title="{html.escape(why)}">-</td>')
                continue
            r = match.iloc[0]
            acc, dimp = _fmt(r.acc_mean, r.acc_std), ("-" if math.isnan(r.dimp) else f"{r.dimp:.2f}")
            if r.significant:
                acc, dimp = f"<b><u>{acc}</u></b>", f"<b><u>{dimp}</u></b>"
            title = f"n={r.n}, one-sided Welch p={r.p:.3g}, BH-adjusted p={r.p_bh:.3g}" if not math.isnan(r.p) else f"n={r.n}"
            href = "#" + r.anchor
            cells.append(f'<td title="{title}">{_linked(acc, href)}</td><td title="{title}">{_linked(dimp, href)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    dataset = table.dataset.dropna().iloc[0] if table.dataset.notna().any() else None
    random_acc_text = _linked(_fmt(random_acc.mean, random_acc.std),
                              "#" + trials_anchor("random", "none", None, dataset=dataset))
    random_row = (f"<tr><td>Random</td><td>–</td><td colspan=\"{2 * len(algorithms)}\">"
                  f"{random_acc_text} (n={random_acc.n}, the dImp reference)</td></tr>")
    return (
        '<table class="nas-table">'
        + (f"<caption>{html.escape(caption)}</caption>" if caption else "")
        + f"<thead><tr><th>Poisoning attack</th><th>p</th>{head}</tr><tr><th></th><th></th>{sub}</tr></thead>"
        + "<tbody>" + "".join(body) + random_row + "</tbody></table>"
    )


#: TMLR Table 2's column groups: the algorithm whose metrics, in the paper's order
SENSITIVITY_GROUPS = ("tenas", "robot")
#: how Table 2 heads a metric's column (HTML)
METRIC_HEADS = {"ntk_condition_number": "κ<sub>NTK</sub>", "linear_regions": "<i>R</i>"}
SENSITIVITY_COLUMNS = ["attack", "budget", "target", "metrics_of", "metric", "mean", "std", "n", "skipped", "notebook",
                       "not_run"]


def metrics_of(metric: str) -> str:
    """The algorithm a training-free metric belongs to in Table 2: TE-NAS's two, RoBoT's others."""
    from ..studies.tenas_indicators import TENAS_METRICS

    return "tenas" if metric in TENAS_METRICS else "robot"


def load_sensitivity(spec: dict, inputs: dict[str, str]) -> pd.DataFrame:
    """One row per (poison set, metric): the metric's percentage change, mean/std over
    architectures, and whose metric it is (``metrics_of``); then one row per metric of each
    study the grid could not run (``spec["sensitivity_not_run"]``), ``not_run`` the reason."""
    from ..nas.zero_cost import METRICS
    from ..studies.tenas_indicators import TENAS_METRICS

    rows = []
    for study in spec.get("sensitivity", []):
        result = read_json(Path(inputs[study["role"]]) / RESULT_FILE)
        for line in result["summary"]:
            rows.append({"attack": study["attack"], "budget": study["budget"], "target": study.get("target") or "",
                         "metrics_of": study.get("metrics_of") or metrics_of(line["metric"]), **line,
                         "notebook": artifact_href(inputs[study["role"]]), "not_run": ""})
    for missing in spec.get("sensitivity_not_run", []):
        measured = [r["metric"] for r in rows if r["metrics_of"] == missing["metrics_of"]]
        names = list(dict.fromkeys(measured)) or list(TENAS_METRICS if missing["metrics_of"] == "tenas" else METRICS)
        rows += [{"attack": missing["attack"], "budget": missing["budget"], "target": "",
                  "metrics_of": missing["metrics_of"], "metric": metric, "mean": math.nan, "std": math.nan, "n": 0,
                  "skipped": 0, "notebook": "", "not_run": missing["reason"]} for metric in names]
    return pd.DataFrame(rows, columns=SENSITIVITY_COLUMNS)


def sensitivity_html(table: pd.DataFrame, caption: str = "") -> str:
    """TMLR Table 2's layout: one row per attack and budget; column groups per algorithm
    (TE-NAS, then RoBoT), one column per metric, mean ± std of the change in percent. Under
    gradient canceling each group's cells read the poisons crafted against its algorithm (the
    cell's title says which); a study the grid could not run reads "not run", its title the reason."""
    table = table.fillna({"not_run": "", "target": ""})
    if "metrics_of" not in table:
        table = table.assign(metrics_of=[metrics_of(m) for m in table.metric])
    groups = [g for g in SENSITIVITY_GROUPS if g in set(table.metrics_of)]
    groups += [g for g in dict.fromkeys(table.metrics_of) if g not in groups]
    columns = [(g, m) for g in groups for m in dict.fromkeys(table.metric[table.metrics_of == g])]
    conditions = list(dict.fromkeys(zip(table.attack, table.budget)))
    body = []
    for attack, budget in conditions:
        cells = [f"<td>{html.escape(condition_label(attack, budget))}</td>"]
        for group, metric in columns:
            match = table[(table.attack == attack) & (table.budget == budget) & (table.metrics_of == group)
                          & (table.metric == metric)]
            if match.empty:
                cells.append('<td title="not in this run">-</td>')
                continue
            r = match.iloc[0]
            if r["not_run"]:
                cells.append(f'<td title="{html.escape(r["not_run"])}">not run</td>')
                continue
            title = f"{r.n} architectures, {r.skipped} undefined"
            if r["target"]:
                title += f"; poisons crafted against {algorithm_name(r['target'])}"
            cells.append(f'<td title="{html.escape(title)}">{_linked(_fmt(r["mean"], r["std"]), r["notebook"])}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    spans = "".join(f'<th colspan="{sum(g == group for g, _ in columns)}">{html.escape(algorithm_name(group))}</th>'
                    for group in groups)
    heads = "".join(f"<th>{METRIC_HEADS.get(m, html.escape(m))}</th>" for _, m in columns)
    return ('<table class="nas-table">' + (f"<caption>{html.escape(caption)}</caption>" if caption else "")
            + f'<thead><tr><th rowspan="2">Poisoning attack</th>{spans}</tr><tr>{heads}</tr></thead><tbody>'
            + "".join(body) + "</tbody></table>")


def poison_figure(spec: dict, inputs: dict[str, str], count: int = 6):
    """TMLR Figure 2: the same randomly drawn search images clean and under every clean-label
    attack of the run at one budget, with each perturbation magnified; None without one."""
    from ..pipeline.params import DataParams
    from .poison_figures import poison_grid
    from ..core.poison_set import PoisonSet
    from ..pipeline.steps import search_pool

    data = grid_datasets(spec["settings"])[0]   # the primary dataset's poisons
    studies = [p for p in spec.get("poisons", [])
               if p["attack"] not in ("rlf", "clf") and p.get("dataset", data["dataset"]) == data["dataset"]]
    if not studies:
        return None
    budget = max(p["budget"] for p in studies)   # the largest: the same victims for every attack
    pool = search_pool(DataParams.model_validate(data))
    sets = {}
    for p in studies:
        if p["budget"] == budget:
            name = attack_name(p["attack"]) + (f" vs {algorithm_name(p['target'])}" if p.get("target") else "")
            sets[name] = PoisonSet.load(inputs[p["role"]], pool)
    common = sorted(set.intersection(*(set(s.indices.tolist()) for s in sets.values())))
    if not common:
        return None
    variants = {}
    for name, s in sets.items():
        row = {int(index): position for position, index in enumerate(s.indices)}
        variants[name] = s.images[[row[i] for i in common]]
    eps = max(s.header.get("eps") or 0 for s in sets.values())
    return poison_grid(pool.images[common], variants, count=count, eps=eps,
                       labels=[pool.classes[int(pool.labels[i])] for i in common])


def ood_html(results: pd.DataFrame, random_acc: CellSummary, dataset: str, alpha: float = 0.05) -> str:
    """TMLR Table 3: each algorithm searched on its own (clean) data and on out-of-distribution
    data, every architecture retrained and tested on ``dataset``; Acc. and dImp. An OOD cell is
    bold and underlined, as in Table 1, where the one-sided Welch test finds its accuracy below
    the algorithm's in-distribution clean trials, Benjamini-Hochberg over the algorithm's OOD
    cells: the ``ood:<dataset>`` rows of :func:`cells_csv` (the same computation); each cell's
    title gives n and the p-values."""
    ood = results[results.study == "ood"]
    if ood.empty:
        return ""
    tests = cells_csv(results, dataset, alpha)
    sources = list(dict.fromkeys(ood.search_dataset))
    algorithms = [a for a in dict.fromkeys(ood.algorithm)]
    head = "".join(f'<th colspan="2">searched on {html.escape(s)}</th>' for s in [dataset, *sources])
    sub = "".join("<th>Acc.</th><th>ΔImp.</th>" for _ in range(1 + len(sources)))
    body = []
    for algorithm in algorithms:
        cells = [f"<td>{html.escape(algorithm_name(algorithm))}</td>"]
        groups = [(None, results[(results.study == "main") & (results.algorithm == algorithm)
                                 & (results.attack == "none")])]
        groups += [(s, ood[(ood.algorithm == algorithm) & (ood.search_dataset == s)]) for s in sources]
        for source, group in groups:
            s = CellSummary.of(group.acc)
            dimp = delta_improvement(s.mean, random_acc.mean)
            if group.empty:
                cells.append("<td>-</td><td>-</td>")
                continue
            acc, dimp = _fmt(s.mean, s.std), "-" if math.isnan(dimp) else f"{dimp:.2f}"
            title = f"n={s.n}" + (", the in-distribution reference" if source is None else "")
            test = tests[(tests.study == f"ood:{source}") & (tests.algorithm == algorithm)]
            if source is not None and len(test) and not math.isnan(test.p.iloc[0]):
                r = test.iloc[0]
                title += (f", one-sided Welch p={r.p:.3g} against the {dataset} trials, BH-adjusted p={r.p_bh:.3g}"
                          f" (over {algorithm_name(algorithm)}'s out-of-distribution cells)")
                if r.significant:
                    acc, dimp = f"<b><u>{acc}</u></b>", f"<b><u>{dimp}</u></b>"
            href = "#" + group.anchor.iloc[0]
            cells.append(f'<td title="{html.escape(title)}">{_linked(acc, href)}</td>'
                         f'<td title="{html.escape(title)}">{_linked(dimp, href)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return ('<table class="nas-table"><caption>TMLR Table 3. Out-of-distribution search: architectures found on '
            f'other data, retrained and tested on {html.escape(dataset)} (accuracy in %); bold and underlined: '
            f'significantly below the search on {html.escape(dataset)} (one-sided Welch, Benjamini-Hochberg per '
            f'algorithm, α={alpha:g}).</caption>'
            f"<thead><tr><th>NAS</th>{head}</tr><tr><th></th>{sub}</tr></thead><tbody>" + "".join(body) + "</tbody></table>")


def defense_html(results: pd.DataFrame, random_acc: CellSummary, alpha: float = 0.05) -> str:
    """TMLR Table 4: per defence, attack and NAS algorithm, Acc. and dImp of the defended
    search; bold and underlined where a one-sided Welch test finds the defended accuracy
    higher than the undefended poisoned one (Benjamini-Hochberg over the table's p-values)."""
    defended = results[results.study.str.startswith("defense:")]
    if defended.empty:
        return ""
    rows = []
    for (defense, attack, budget, algorithm), group in defended.groupby(
            [defended.study.str.removeprefix("defense:"), "attack", "budget", "algorithm"], sort=False):
        poisoned = results[(results.study == "main") & (results.algorithm == algorithm) & _rows_of(results, attack, budget)]
        s = CellSummary.of(group.acc)
        rows.append({"defense": defense, "attack": attack, "budget": budget, "algorithm": algorithm, "summary": s,
                     "href": "#" + group.anchor.iloc[0],
                     "poisoned_href": "#" + (poisoned.anchor.iloc[0] if len(poisoned) else trials_anchor(algorithm, attack, budget)),
                     "poisoned": CellSummary.of(poisoned.acc), "p": welch_less(poisoned.acc.to_numpy(), group.acc.to_numpy())})
    reject, adjusted = benjamini_hochberg([r["p"] for r in rows], alpha)
    body = []
    for r, rej, adj in zip(rows, reject, adjusted):
        acc, dimp = _fmt(r["summary"].mean, r["summary"].std), delta_improvement(r["summary"].mean, random_acc.mean)
        dimp = "-" if math.isnan(dimp) else f"{dimp:.2f}"
        if rej:
            acc, dimp = f"<b><u>{acc}</u></b>", f"<b><u>{dimp}</u></b>"
        acc, dimp = _linked(acc, r["href"]), _linked(dimp, r["href"])
        title = f"one-sided Welch p={r['p']:.3g}, BH-adjusted p={adj:.3g}" if not math.isnan(r["p"]) else ""
        body.append(f"<tr><td>{html.escape(r['defense'])}</td><td>{html.escape(condition_label(r['attack'], r['budget']))}</td>"
                    f"<td>{html.escape(algorithm_name(r['algorithm']))}</td>"
                    f"<td>{_linked(_fmt(r['poisoned'].mean, r['poisoned'].std), r['poisoned_href'])}</td>"
                    f'<td title="{title}">{acc}</td><td title="{title}">{dimp}</td></tr>')
    return ('<table class="nas-table"><caption>TMLR Table 4. Defences: accuracy (%) without and with the defence; '
            "bold and underlined: the defence significantly improves on the poisoned search.</caption>"
            "<thead><tr><th>Defence</th><th>Attack</th><th>NAS</th><th>Poisoned Acc.</th><th>Defended Acc.</th>"
            "<th>ΔImp.</th></tr></thead><tbody>" + "".join(body) + "</tbody></table>")


def reference_points_html(results: pd.DataFrame, random_acc: CellSummary) -> str:
    """The workshop paper's Table 1: clean DARTS against its two reference points, random
    sampling and anti-search (the worst cells DARTS can find), with the normal cell's make-up;
    the main study's trials only (not the searches on other data or without augmentation)."""
    rows = []
    for algorithm, label in (("darts", "DARTS (clean)"), ("random", "Random sampling"), ("darts_anti", "DARTS anti-search")):
        group = results[(results.algorithm == algorithm) & (results.attack == "none") & (results.study == "main")]
        if group.empty:
            continue
        summary = CellSummary.of(group.acc)
        counts = [g.counts("normal") for g in group.genotype]
        make_up = " / ".join(f"{np.mean([c[k] for c in counts]):.1f}" for k in ("conv", "pool", "skip"))
        dimp = delta_improvement(summary.mean, random_acc.mean)
        accuracy = _linked(_fmt(summary.mean, summary.std), "#" + group.anchor.iloc[0])
        rows.append(f"<tr><td>{label}</td><td>{summary.n}</td><td>{accuracy}</td>"
                    f"<td>{'–' if algorithm == 'random' else f'{dimp:.2f}'}</td><td>{make_up}</td></tr>")
    if not rows:
        return ""
    return ('<table class="nas-table"><caption>Workshop Table 1. DARTS against random sampling and anti-search '
            '(accuracy in %; normal cell: mean number of convolutions / pools / skips).</caption>'
            "<thead><tr><th>Search</th><th>n</th><th>Acc.</th><th>ΔImp.</th><th>conv / pool / skip</th></tr></thead>"
            "<tbody>" + "".join(rows) + "</tbody></table>")


def budget_figure(table: pd.DataFrame, algorithm: str = "darts"):
    """Workshop Figure 3: accuracy against the poisoning budget, one line per attack, error
    bars one standard deviation over trials, the clean accuracy at budget 0; None without data."""
    from matplotlib.figure import Figure

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
    import io

    from IPython.display import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return Image(data=buffer.getvalue(), format="png")


def trial_condition(row) -> str:
    """A trial's condition as the figures and the listing name it, with its study."""
    condition = "random sampling" if row.algorithm == "random" else condition_label(row.attack, row.budget)
    if row.study == "ood":
        condition += f", searched on {row.search_dataset}"
    elif row.study == "no_augment":
        condition += ", search without augmentation"
    elif row.study.startswith("defense:"):
        condition += f", defended by {row.study.removeprefix('defense:')}"
    return condition


def trials_figure(results: pd.DataFrame):
    """Every trial's accuracy, one row per condition (the labels read horizontally, however many
    conditions there are), a colour per NAS algorithm; None without trials."""
    import seaborn as sns
    from matplotlib.figure import Figure

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


def cells_html(genotype: Genotype, caption: str) -> str:
    """One architecture's normal and reduction cells side by side, as inline SVG."""
    from .figures import cell_svg

    def strip_prolog(svg: str) -> str:  # inline SVG must not carry an XML declaration or doctype
        return svg[svg.index("<svg"):]

    return (
        f'<figure class="cells"><figcaption>{html.escape(caption)}<br><small>{html.escape(genotype.summary())}'
        f'</small></figcaption><div class="pair"><div>{strip_prolog(cell_svg(genotype, "normal", "normal cell"))}</div>'
        f'<div>{strip_prolog(cell_svg(genotype, "reduce", "reduction cell"))}</div></div></figure>'
    )


TABLE_CSS = """
<style>
table.nas-table { border-collapse: collapse; margin: 1em 0; font-size: 0.95em; }
table.nas-table caption { caption-side: top; text-align: left; padding-bottom: 0.5em; }
table.nas-table th, table.nas-table td { border-bottom: 1px solid #ccc; padding: 4px 10px; text-align: center; }
table.nas-table thead th { border-bottom: 2px solid #333; }
figure.cells { margin: 1em 0 2em 0; }
figure.cells figcaption { font-weight: bold; margin-bottom: 0.3em; }
figure.cells .pair { display: flex; flex-wrap: wrap; gap: 2em; align-items: center; }
figure.cells svg { max-width: 100%; height: auto; }
</style>
"""
