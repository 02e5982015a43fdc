"""Where the results were computed: the machines, devices, thread counts and library versions
recorded with each artifact (:func:`nbutils.core.device.environment`), listed in the report.

A trial repeats bitwise only on the same kind of machine with the same thread count and library
versions; elsewhere its last digits differ. The list says which of those a run's numbers come
from, and whether they come from more than one.
"""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from ..core.store import SPEC_FILE, read_json

COLUMNS = ["host", "device", "threads", "python", "libraries", "platform", "stages"]
NOT_RECORDED = "not recorded (computed before environments were recorded)"


def environment_of(folder: str | Path) -> dict | None:
    """The environment an artifact's stage ran in (None: not recorded, or no such artifact)."""
    path = Path(folder) / SPEC_FILE
    return read_json(path).get("environment") if path.is_file() else None


def environments(folders: list[str | Path]) -> pd.DataFrame:
    """One row per distinct environment among the artifacts ``folders`` (each counted once),
    with the number of stages computed in it; artifacts without a record make a row of their own."""
    counts: dict[tuple, int] = {}
    for folder in dict.fromkeys(str(f) for f in folders):
        where = environment_of(folder)
        if where is None:
            row = (NOT_RECORDED, "", "", "", "", "")
        else:
            device = where["device"] + (f" ({where['gpu']})" if where.get("gpu") else "")
            libraries = ", ".join(f"{name} {version}" for name, version in sorted(where.get("libraries", {}).items()))
            row = (where["host"], device, str(where["threads"]), where["python"], libraries, where["platform"])
        counts[row] = counts.get(row, 0) + 1
    return pd.DataFrame([(*row, n) for row, n in counts.items()], columns=COLUMNS)


def environments_html(table: pd.DataFrame) -> str:
    """The table as escaped HTML (host names and versions are data, never markup)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in table.itertuples(index=False))
    return f'<table class="nas-table"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def environments_sentence(table: pd.DataFrame) -> str:
    """Whether the run's numbers come from one environment or several."""
    recorded = table[table.host != NOT_RECORDED]
    if len(recorded) <= 1 and len(recorded) == len(table):
        return ("Every stage ran in the one environment below: the same preset repeats these numbers bitwise in it, "
                "and on another machine, thread count or library version gives numbers that differ in their last digits.")
    return (f"The stages ran in {len(table)} environments (below): trials computed in different ones differ in "
            "their last digits, beside the differences the seeds make.")
