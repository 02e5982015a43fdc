"""Where a run's time went: the steps' own work against the cost of executing notebooks.

    python benchmarks/papermill_overhead.py [OUTPUTS]        # default: outputs/

Reads the artifacts of a finished run (nothing is recomputed). For every stage, the runner
records the seconds of its execution (``spec.json``: the execution's wall time, shared out
between the trials it ran); the step records the seconds of its own work (``result.json``
``seconds``; a poison set's ``crafting_seconds``). The difference is the overhead of running
the step as a notebook: starting the kernel, importing torch and the libraries, loading the
data, executing the cells that display the results, and writing the executed notebook.
The gallery and the report are all display, so they are listed apart.

Prints per stage kind: stages, executions, execution seconds, the steps' seconds, and the
overhead share; then the total.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

WORK_FILES = {"poison": ("poison.json", "crafting_seconds")}
DISPLAY_ONLY = ("gallery", "report")


def step_seconds(folder: Path, kind: str) -> float | None:
    name, key = WORK_FILES.get(kind, ("result.json", "seconds"))
    path = folder / name
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get(key)
    return float(value) if value is not None else None


def main(outputs: Path) -> None:
    rows = defaultdict(lambda: {"stages": 0, "executions": set(), "seconds": 0.0, "work": 0.0})
    for record_path in sorted(outputs.glob("*/*/spec.json")):
        folder = record_path.parent
        record = json.loads(record_path.read_text())
        kind = record["kind"]
        row = rows[kind]
        row["stages"] += 1
        execution = record.get("execution") or {"seconds": record["seconds"], "stages": 1}
        row["executions"].add((execution["seconds"], execution["stages"]))
        row["seconds"] += record["seconds"]
        work = step_seconds(folder, kind)
        row["work"] += record["seconds"] if kind in DISPLAY_ONLY else (work or 0.0)
    if not rows:
        sys.exit(f"no stages under {outputs}")
    print(f"{'stage':<12}{'stages':>7}{'executions':>11}{'seconds':>10}{'step work':>11}{'overhead':>10}")
    total = {"stages": 0, "executions": 0, "seconds": 0.0, "work": 0.0}
    for kind, row in sorted(rows.items(), key=lambda kv: -kv[1]["seconds"]):
        executions = len(row["executions"])
        share = 1 - row["work"] / row["seconds"] if row["seconds"] else 0.0
        note = "  (display only)" if kind in DISPLAY_ONLY else ""
        print(f"{kind:<12}{row['stages']:>7}{executions:>11}{row['seconds']:>10.0f}{row['work']:>11.0f}{share:>10.0%}{note}")
        total["stages"] += row["stages"]
        total["executions"] += executions
        total["seconds"] += row["seconds"]
        total["work"] += row["work"]
    share = 1 - total["work"] / total["seconds"]
    print(f"{'total':<12}{total['stages']:>7}{total['executions']:>11}{total['seconds']:>10.0f}{total['work']:>11.0f}{share:>10.0%}")
    print(f"\nnotebook overhead: {total['seconds'] - total['work']:.0f} s of {total['seconds']:.0f} s of execution "
          f"({share:.0%}); {(total['seconds'] - total['work']) / total['executions']:.1f} s per execution")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="?", type=Path, default=Path("outputs"),
                        help="the outputs folder of a finished run (default: outputs)")
    main(parser.parse_args().outputs)
