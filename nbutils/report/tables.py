"""The papers' tables as HTML, and the listing of every trial the tables link to; their numbers
come from :mod:`~nbutils.report.table_cells`, their names from :mod:`~nbutils.report.names`.

Links: every accuracy in a table links to its trials in the "Every architecture" listing
(:func:`trials_html`), where each trial's accuracy links to the executed notebook of its
retraining and of its search, and to their artifact folders. Links are relative to the
outputs folder, where the runner puts ``report.html``.
"""
from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

from ..nas import registry
from .names import LABEL_FLIPS, algorithm_name, attack_name, condition_label, trial_condition
from .results import artifact_href, metrics_of, no_budget, trials_anchor
from .stats import CellSummary, benjamini_hochberg, delta_improvement, welch_less
from .table_cells import cells_csv, condition_rows


def _linked(text: str, href: str, title: str = "") -> str:
    title = f' title="{html.escape(title)}"' if title else ""
    return f'<a href="{html.escape(href)}"{title}>{text}</a>'


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if not math.isnan(std) else f"{mean:.2f}"


def not_run_reason(algorithm: str, attack: str) -> str:
    if algorithm in registry.names(label_free=True) and attack in LABEL_FLIPS:
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
            match = table[(table.algorithm == a) & condition_rows(table, attack, budget)]
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
SENSITIVITY_GROUPS = registry.names(metric_based=True)
#: how Table 2 heads a metric's column (HTML)
METRIC_HEADS = {"ntk_condition_number": "κ<sub>NTK</sub>", "linear_regions": "<i>R</i>"}


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
        poisoned = results[(results.study == "main") & (results.algorithm == algorithm)
                           & condition_rows(results, attack, budget)]
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
    inverted = [name for name, reference in registry.TESTED_AGAINST.items() if reference == "darts"]
    labels = [("darts", "DARTS (clean)"), ("random", "Random sampling"), *((a, algorithm_name(a)) for a in inverted)]
    for algorithm, label in labels:
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
