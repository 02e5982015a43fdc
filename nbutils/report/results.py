"""The rows the report reads from the artifacts (the report never trains): one per retrained
architecture (:func:`load_results`), written out as ``outputs/trials.csv`` (:func:`trials_csv`),
and one per poison set and training-free metric (:func:`load_sensitivity`); with where each trial
is listed in the report (:func:`trials_anchor`) and where its artifacts lie (:func:`artifact_href`).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from ..core.store import read_json
from ..nas.zero_cost import METRICS
from ..space.genotype import Genotype
from ..studies.tenas_indicators import TENAS_METRICS

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
    """The HTML id of one cell's trials in the listing (:func:`~nbutils.report.tables.trials_html`); ``dataset``: the
    dataset the trials were retrained on."""
    parts = [study, algorithm, attack, "" if no_budget(budget) else f"{100 * budget:g}", search_dataset or "",
             dataset or ""]
    return "trials-" + re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def artifact_href(folder: str | Path, file: str = "notebook.ipynb") -> str:
    """A stage folder ``<outputs>/<kind>/<key>`` (or a file in it) relative to the outputs folder."""
    folder = Path(folder)
    return f"{folder.parent.name}/{folder.name}/{file}".rstrip("/")


def no_budget(budget) -> bool:
    """Whether a budget cell is empty (None, or NaN once pandas has stored it as a float)."""
    return budget is None or (isinstance(budget, float) and math.isnan(budget))


#: the columns of outputs/trials.csv (documented in outputs/README.md)
TRIALS_CSV_COLUMNS = ["study", "dataset", "search_dataset", "algorithm", "attack", "budget", "trial", "seed", "acc",
                      "parameters", "search_seconds", "retrain_seconds", "genotype", "retrain_artifact",
                      "search_artifact"]


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


#: :func:`load_sensitivity`'s columns
SENSITIVITY_COLUMNS = ["attack", "budget", "target", "metrics_of", "metric", "mean", "std", "n", "skipped", "notebook",
                       "not_run"]


def metrics_of(metric: str) -> str:
    """The algorithm a training-free metric belongs to in Table 2: TE-NAS's two, RoBoT's others."""
    return "tenas" if metric in TENAS_METRICS else "robot"


def load_sensitivity(spec: dict, inputs: dict[str, str]) -> pd.DataFrame:
    """One row per (poison set, metric): the metric's percentage change, mean/std over
    architectures, and whose metric it is (``metrics_of``); then one row per metric of each
    study the grid could not run (``spec["sensitivity_not_run"]``), ``not_run`` the reason."""
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
