"""Where a run's time went: the steps' own work against the cost of executing notebooks.

    python benchmarks/papermill_overhead.py [OUTPUTS]        # default: outputs/
    python benchmarks/papermill_overhead.py --startup [N]    # the fixed cost of one execution, N repeats

Reads the artifacts of a finished run (nothing is recomputed). For every stage, the runner
records the seconds of its execution (``spec.json``: the execution's wall time, shared out
between the trials it ran); the step records the seconds of its own work (``result.json``
``seconds``; a poison set's ``crafting_seconds``). The difference is the overhead of running
the step as a notebook: starting the kernel, importing torch and the libraries, loading the
data, executing the cells that display the results, and writing the executed notebook (with
warm kernels, nbutils.pipeline.warm_kernel, the first three are paid once per worker).
The gallery and the report are all display, so they are listed apart.

Prints per stage kind: stages, executions, execution seconds, the steps' seconds, and the
overhead share; then the total.

``--startup`` measures the parts of one execution's fixed cost on this machine instead, each
as a papermill execution of a small notebook: a fresh kernel running nothing; a fresh kernel
importing what the notebooks import; the same plus torch's compiler machinery (which an
optimiser's first step imports); and a warm kernel running the import cell again, after being
restored to its start state.
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


IMPORTS = """import logging
import pandas as pd
from IPython.display import SVG, Markdown, display
from nbutils.report import figures
from nbutils.pipeline import batches, examples, steps"""


def startup(repeats: int) -> None:
    """Seconds of each part of an execution's fixed cost (median of ``repeats``)."""
    import os
    import statistics
    import tempfile
    import time

    import nbformat
    import papermill

    from nbutils.core.malloc import MALLOC_ENV
    from nbutils.pipeline.execution import kernel_name
    from nbutils.pipeline.warm_kernel import WarmKernel

    os.environ.update(MALLOC_ENV)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    name = kernel_name()
    folder = Path(tempfile.mkdtemp(prefix="startup-"))

    def notebook(tag: str, source: str) -> Path:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(source)]
        nb.metadata.kernelspec = {"name": name, "display_name": name, "language": "python"}
        path = folder / f"{tag}.ipynb"
        nbformat.write(nb, path)
        return path

    def seconds(run) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def fresh(path: Path):
        return lambda: papermill.execute_notebook(str(path), str(folder / "out.ipynb"), kernel_name=name,
                                                  progress_bar=False, cwd=str(folder))

    rows = {"fresh kernel, empty notebook": seconds(fresh(notebook("empty", "pass"))),
            "fresh kernel, the notebooks' imports": seconds(fresh(notebook("imports", IMPORTS))),
            "  + torch's compiler (first optimiser step)": seconds(fresh(notebook("dynamo", IMPORTS + "\nimport torch._dynamo")))}
    warm = WarmKernel(name, folder)
    try:
        imports = notebook("warm", IMPORTS + "\nimport torch._dynamo")
        warm.execute(imports, folder / "out.ipynb", {}, progress_bar=False)
        rows["warm kernel, the same notebook again"] = seconds(
            lambda: warm.execute(imports, folder / "out.ipynb", {}, progress_bar=False))
        assert warm.started == 1
    finally:
        warm.close()
    print(f"{'per execution (median of ' + str(repeats) + ')':<48}{'seconds':>8}")
    for label, value in rows.items():
        print(f"{label:<48}{value:>8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="?", type=Path, default=Path("outputs"),
                        help="the outputs folder of a finished run (default: outputs)")
    parser.add_argument("--startup", type=int, nargs="?", const=3, default=None, metavar="N",
                        help="measure the fixed cost of one execution instead (N repeats, default 3)")
    args = parser.parse_args()
    if args.startup:
        startup(args.startup)
    else:
        main(args.outputs)
