"""From a preset to a report: validate the parameter files, check the data, expand the grid
into stages (:mod:`~nbutils.pipeline.stages`), execute every stage whose artifact does not
exist yet (:mod:`~nbutils.pipeline.execution`: in order in this process, or on Dask through
:mod:`~nbutils.pipeline.cluster`), publish the report and summarise.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from ..core.datasets import DATA_ROOT_ENV, load_dataset
from ..defenses.denoising import ddpm_folders
from ..core.store import ArtifactStore, atomic_write_bytes
from . import params
from .code_versions import NOTEBOOK_OF, PROJECT_ROOT
from . import warm_kernel
from .cost_model import CostModel
from .execution import (CELLS_CSV, EPOCHS_CSV, REPORT_HTML, STAGE_BASE, TRIALS_CSV, Outcome, default_workers,
                        kernel_name, run_execution)
from .progress import Plan, Progress
from .stages import Stage, expand, mark_reruns, needed_by

log = logging.getLogger(__name__)

OUTPUTS_README = PROJECT_ROOT / "outputs" / "README.md"   # what a run writes, the CSV columns among it


def preflight(preset: params.Preset) -> None:
    """Everything that can be checked before compute: data present, a denoiser's local DDPM
    folder complete, graphviz installed."""
    primary = preset.grid.primary
    for data in preset.grid.datasets:
        for split in ("train", "test"):
            load_dataset(data.dataset, split, data.data_root, data.download)
    for ood in preset.grid.ood:
        for split in ("train", "test"):
            load_dataset(ood.dataset, split, primary.data_root, primary.download)
    ddpm_path = preset.defend.denoise.get("ddpm_path")
    if ddpm_path and any(d.name == "denoise" for d in preset.grid.defenses):
        try:
            ddpm_folders(ddpm_path)
        except ValueError as e:
            raise RuntimeError(f"defend.yaml: denoise.{e}; make one with diffusers' DDPMPipeline.from_pretrained"
                               f"(...).save_pretrained(folder), as params/paper/defend.yaml says") from None
    if shutil.which("dot") is None:
        raise RuntimeError(
            "graphviz's `dot` program was not found; the report draws cells with it. "
            "Install it with `sudo apt-get install graphviz` (or `conda install graphviz`)."
        )


def publish_report(stage: Path, outputs: Path) -> Path:
    """The report stage's page as ``outputs/report.html``, its links relative to ``outputs``,
    with the results as data beside it (``trials.csv``, ``cells.csv``, ``epochs.csv``, and
    ``README.md``, which describes them, when the folder has none)."""
    outputs = Path(outputs)
    target = outputs / REPORT_HTML
    atomic_write_bytes(target, (stage / REPORT_HTML).read_text().replace(STAGE_BASE, "", 1).encode())
    for name in (TRIALS_CSV, CELLS_CSV, EPOCHS_CSV):
        if (stage / name).is_file():
            atomic_write_bytes(outputs / name, (stage / name).read_bytes())
    if OUTPUTS_README.is_file() and not (outputs / OUTPUTS_README.name).exists():
        atomic_write_bytes(outputs / OUTPUTS_README.name, OUTPUTS_README.read_bytes())
    return target


#: a notebook cell may run this many times its estimate (:mod:`~nbutils.pipeline.cost_model`)
#: before its execution fails: estimates can be several times off on a busy or slower machine
TIMEOUT_MARGIN = 10.0
#: and never less than this (seconds): short stages' estimates are the least certain
MIN_TIMEOUT = 900.0


def parse_timeouts(values: Sequence[str]) -> dict[str | None, int | None]:
    """``--timeout`` values: ``SECONDS`` for every kind (key None) or ``KIND=SECONDS``, rounded up
    to whole seconds; 0 is no limit (None). Refused before any compute, naming the value and
    what is allowed."""
    timeouts: dict[str | None, int | None] = {}
    for value in values:
        kind, _, seconds = value.rpartition("=")
        if kind and kind not in NOTEBOOK_OF:
            raise params.ParamsError(f"--timeout {value!r}: {kind!r} is not a kind of stage; allowed: {', '.join(NOTEBOOK_OF)}")
        try:
            limit = float(seconds)
        except ValueError:
            limit = -1.0
        if not limit >= 0 or limit == float("inf"):
            raise params.ParamsError(f"--timeout {value!r}: allowed: [KIND=]SECONDS with SECONDS a number >= 0 (0: no limit)")
        timeouts[kind or None] = math.ceil(limit) or None
    return timeouts


def execution_timeout(group: Sequence[Stage], plan: Plan, timeouts: dict[str | None, int | None]) -> int | None:
    """Whole seconds (papermill takes no fraction) one cell of this execution may run:
    ``--timeout`` for its kind or for all, else :data:`TIMEOUT_MARGIN` times the estimate of its
    stages, at least :data:`MIN_TIMEOUT`."""
    kind = group[0].kind
    for given in (kind, None):
        if given in timeouts:
            return timeouts[given]
    return math.ceil(max(MIN_TIMEOUT, TIMEOUT_MARGIN * sum(plan.estimate(s).seconds for s in group)))


def run(preset_dir: str | Path, outputs: str | Path = "outputs", only: str | None = None,
        dry_run: bool = False, inline: bool = False, workers: int | None = None, scheduler: str | None = None,
        rerun: Sequence[str] = (), fresh_kernels: bool = False, timeouts: Sequence[str] = (),
        out=sys.stdout) -> list[Outcome]:
    """Validate, check, then execute every stage not already in the store.

    ``workers``: stages run at once on a local Dask cluster (default: one per CPU core; 1 runs
    them one after another in this process without Dask); ``scheduler``: the address of an
    existing Dask cluster to run them on instead. ``inline``: the steps in the executing
    process instead of their notebooks, see :func:`execute`. ``rerun``: kinds of stage to run
    again although their artifacts exist, with every stage that reads them (each new artifact
    replaces the old one once complete). ``fresh_kernels``: a kernel started for each notebook
    instead of one warm kernel per worker (:mod:`~nbutils.pipeline.warm_kernel`). ``timeouts``:
    ``--timeout`` values (:func:`parse_timeouts`, :func:`execution_timeout`).

    ``dry_run`` lists the stages and prints what the run would cost (per kind: stages, CPU
    hours, and whether each estimate is recorded, measured or modelled; the wall time on the
    workers), see :mod:`~nbutils.pipeline.progress`. A run prints the same estimate first, then
    a line per finished stage with the stages done and the time left.

    ``outputs`` is taken relative to the caller's working directory and made absolute before
    anything reads it: every path handed to a notebook is absolute, since its kernel runs in
    ``notebooks/``."""
    outputs = Path(outputs).resolve()
    if os.environ.get(DATA_ROOT_ENV):   # the kernels inherit it, in another working directory
        os.environ[DATA_ROOT_ENV] = str(Path(os.environ[DATA_ROOT_ENV]).expanduser().resolve())
    preset = params.load_preset(preset_dir)
    if workers is not None and workers < 1:
        raise params.ParamsError(f"--workers must be >= 1, got {workers}")
    stages = _stages_to_run(preset, only, rerun)
    limits = parse_timeouts(timeouts)
    store = ArtifactStore(outputs)
    workers = workers or default_workers()
    # warm kernels start notebooks in about a second: one execution per trial; fresh kernels
    # pay ~7 s each: one per condition
    plan = Plan(stages, store, CostModel.from_store(outputs), workers, batched=fresh_kernels)
    if dry_run:
        print_dry_run(stages, store, plan, out)
        return []
    preflight(preset)
    store.clean_partial()
    os.environ["NBUTILS_HEADLESS"] = "1"
    kernel = None if inline else kernel_name()
    started = time.perf_counter()
    progress = Progress(plan, out)
    print(progress.header(), file=out, flush=True)
    if scheduler is None and workers == 1:
        try:
            outcomes = _run_here(stages, store, kernel, progress, fresh_kernels, limits, out)
        finally:
            warm_kernel.shutdown()
    else:
        # here, not above: dask's distributed scheduler takes ~0.4 s to import, which a --dry-run
        # or a run refused for bad input need not pay (and it cannot be declared lazily: it must
        # register its config before run_on_dask sets dask's)
        from .cluster import run_on_dask

        outcomes = run_on_dask(stages, store, kernel, workers=workers, progress=progress, scheduler=scheduler,
                               fresh_kernel=fresh_kernels, timeouts=[execution_timeout(g, plan, limits) for g in plan.groups],
                               out=out)
    for outcome in outcomes:
        if outcome.stage.kind == "report" and outcome.status in ("ran", "reused"):
            publish_report(store.path("report", outcome.stage.key), outputs)
    print_summary(outcomes, time.perf_counter() - started, outputs, out)
    return outcomes


def print_dry_run(stages: list[Stage], store: ArtifactStore, plan: Plan, out) -> None:
    """One line per stage (kind, key, whether it exists, label), then the run's estimated cost."""
    for s in stages:
        state = "rerun" if s.rerun else "exists" if store.exists(s.kind, s.key) else "to run"
        print(f"{s.kind:9s} {s.key}  {state:7s} {s.label}", file=out)
    print("", *plan.summary_lines(), sep="\n", file=out)


def _stages_to_run(preset: params.Preset, only: str | None, rerun: Sequence[str]) -> list[Stage]:
    """The preset's stages, only those of kind ``only`` and the stages they read when it is
    given, each of a kind in ``rerun`` (and each stage reading one) marked to run again."""
    stages = expand(preset)
    if only is not None:
        if only not in NOTEBOOK_OF:
            raise params.ParamsError(f"--only {only!r} is not a stage; allowed: {', '.join(NOTEBOOK_OF)}")
        wanted = {id(s) for s in stages if s.kind == only}
        stages = [s for s in stages if id(s) in wanted or needed_by(s, stages, wanted)]
    unknown = sorted(set(rerun) - set(NOTEBOOK_OF))
    if unknown:
        raise params.ParamsError(f"--rerun {', '.join(unknown)}: not a kind of stage; allowed: {', '.join(NOTEBOOK_OF)}")
    mark_reruns(stages, set(rerun))
    return stages


def _run_here(stages: list[Stage], store: ArtifactStore, kernel: str | None, progress: Progress,
              fresh_kernel: bool, timeouts: dict[str | None, float | None], out) -> list[Outcome]:
    """Every execution in order, in this process; outcomes in stage order."""
    outcomes: dict[int, Outcome] = {}
    for group in progress.plan.groups:
        todo = [s.label for s in group if s.rerun or not store.exists(s.kind, s.key)]
        if todo:
            print(f"[{progress.done + 1}/{len(stages)}] {'; '.join(todo)} ...", file=out, flush=True)
        inputs = [outcomes[id(s)] for stage in group for s in stage.inputs.values()]
        timeout = execution_timeout(group, progress.plan, timeouts)
        for stage, outcome in zip(group, run_execution(group, store, kernel, inputs, fresh_kernel=fresh_kernel,
                                                       timeout=timeout)):
            outcomes[id(stage)] = outcome
            progress.finished(stage, outcome)
    return [outcomes[id(s)] for s in stages]


def print_summary(results: list[Outcome], seconds: float, outputs: Path, out=sys.stdout) -> None:
    by = {status: [r for r in results if r.status == status] for status in ("ran", "reused", "failed", "skipped")}
    print(f"\nSummary ({seconds:.0f} s): {len(by['ran'])} ran, {len(by['reused'])} reused, "
          f"{len(by['failed'])} failed, {len(by['skipped'])} skipped", file=out)
    for r in by["ran"]:
        print(f"  ran     {r.stage.label} ({r.seconds:.1f} s)", file=out)
    for r in by["failed"]:
        print(f"  FAILED  {r.stage.label}: {r.detail}\n          executed notebook: {r.notebook}", file=out)
    for r in by["skipped"]:
        print(f"  skipped {r.stage.label}: {r.detail}", file=out)
    report = outputs / REPORT_HTML
    if report.exists():
        print(f"Report: {report}", file=out)


