"""Executing stages: each stage's notebook run headless by papermill into a private folder,
committed to the store when complete, kept as failed otherwise.

Stages are the unit of storage; *executions* are the unit of work. Consecutive executions in
one process share a warm kernel (:mod:`~nbutils.pipeline.warm_kernel`), restored to its start
state before each notebook and replaced by a fresh one after a failure, so starting a kernel
and importing torch (several seconds) is paid about once per worker, and each trial runs as an
execution of its own. With a fresh kernel per notebook instead (``--fresh-kernels``), the trials
of one condition (the searches of one algorithm on one poison set, then their retrainings) run
in one execution of their notebook, which loops over them (parameter ``trials``), so that cost
is paid once per condition. Every trial gets its own artifact (with a copy of the executed
notebook), and a trial that fails does not take the others of its execution down with it. A failed
stage does not stop the others; the stages that need its artifact are skipped, and the
report shows their cells as missing with the reason.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

import lazy_loader
from traitlets.config import Config

from ..core.device import environment
from ..core.malloc import MALLOC_ENV
from ..core.stage_lock import describe
from ..core.store import ArtifactStore, atomic_write_bytes
from .batches import COMPLETED_FILE, FAILED_FILE, run_trials
from . import steps
from .code_versions import NOTEBOOK_OF, NOTEBOOKS
from .warm_kernel import kernel_for
from .stages import Stage

# imported on first use (lazy_loader): nbformat's schema checks take seconds to import (rfc3987-syntax
# builds its grammar), Jupyter's client a fraction of one, which a --dry-run or a run refused for
# bad input need not pay
papermill = lazy_loader.load("papermill")
jupyter_client = lazy_loader.load("jupyter_client")
nbconvert = lazy_loader.load("nbconvert")
nbformat = lazy_loader.load("nbformat")

log = logging.getLogger(__name__)


STEP_OF = {"surrogate": "surrogate", "poison": "craft_poisons", "search": "search", "retrain": "retrain",
           "sensitivity": "metric_sensitivity", "defend": "defend"}


SUMMARIES = ("gallery", "report")   # read many trials and show what exists when some failed


#: kinds whose trials of one condition share one notebook execution (notebook parameter ``trials``)
BATCHED = ("search", "retrain")


EXECUTED_NOTEBOOK = "notebook.ipynb"


KERNEL_LOG = "kernel.log"   # what the notebook's kernel process printed itself (not its cells' output)


REPORT_HTML = "report.html"
#: the results as data, written by the report notebook beside its page (outputs/README.md)
TRIALS_CSV = "trials.csv"
CELLS_CSV = "cells.csv"
EPOCHS_CSV = "epochs.csv"


#: the report links to artifacts relative to the outputs folder; its copy in the report stage's
#: own folder (two levels down) resolves them through this base, removed from outputs/report.html
STAGE_BASE = '<base href="../../">'


# --- execution ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    stage: Stage
    status: str            # ran | reused | failed | skipped
    seconds: float = 0.0
    detail: str = ""
    notebook: Path | None = None


def kernel_name() -> str:
    """The project's registered kernel when present (``make`` registers it in the venv), else python3."""
    return "nbutils" if "nbutils" in jupyter_client.kernelspec.KernelSpecManager().find_kernel_specs() else "python3"


def executions(stages: list[Stage], batched: bool = True) -> list[list[Stage]]:
    """The stages grouped into executions (see the module docstring), each after the
    executions it reads from; a stage outside :data:`BATCHED` or without a batch is alone.

    ``batched=False`` gives every trial an execution of its own: with warm kernels a notebook
    starts in about a second, and single trials let the workers share out a condition's trials
    and start each retraining as soon as its own search is done, rather than after the
    condition's last one."""
    groups: dict[tuple, list[Stage]] = {}
    for stage in stages:
        alone = not (batched and stage.kind in BATCHED and stage.batch)
        group = (stage.kind, id(stage)) if alone else (stage.kind, stage.batch)
        groups.setdefault(group, []).append(stage)
    where = {id(s): i for i, members in enumerate(groups.values()) for s in members}
    needs = [{where[id(inp)] for s in members for inp in s.inputs.values() if id(inp) in where}
             for members in groups.values()]
    ordered, done = [], set()
    pending = list(range(len(groups)))
    members = list(groups.values())
    while pending:   # stable topological order: the first execution whose inputs are all placed
        ready = next((i for i in pending if needs[i] <= done), None)
        if ready is None:
            raise RuntimeError("executions read each other in a cycle: "
                               + ", ".join(members[i][0].label for i in pending[:3]))
        ordered.append(members[ready])
        done.add(ready)
        pending.remove(ready)
    return ordered


def execute(stages: list[Stage], store: ArtifactStore, kernel: str | None, fresh_kernel: bool = False,
            timeout: float | None = None) -> list[Outcome]:
    """Run stages of one kind in one execution, each into a private folder; commit each one
    that completed, keep each other one as failed.

    With a kernel the stages' notebook runs under papermill (the executed notebook is part of
    every artifact); with ``kernel=None`` the step functions run in this process (no notebook:
    faster, for tests and debugging). The gallery and the report always run as notebooks.
    The notebook runs in this process's warm kernel, or with ``fresh_kernel`` in a kernel
    started for it and stopped after it.
    Kinds in :data:`BATCHED` take the list ``trials`` and mark each trial that completed
    (:func:`nbutils.pipeline.batches.run_trials`); the others take one stage's ``spec``, ``inputs`` and
    ``out_dir``. ``timeout``: seconds a notebook cell may run before the execution fails (None:
    no limit; the steps run in this process, ``kernel=None``, are never interrupted).

    Each committed artifact records where it ran (:func:`nbutils.core.device.environment`)."""
    kind = stages[0].kind
    if any(s.kind != kind for s in stages) or (len(stages) > 1 and kind not in BATCHED):
        raise ValueError(f"one execution runs stages of one kind in {BATCHED}, got {[s.kind for s in stages]}")
    start = time.perf_counter()
    works = [store.begin(s.kind, s.key) for s in stages]
    trials = [{"spec": s.spec, "inputs": {role: str(store.path(i.kind, i.key)) for role, i in s.inputs.items()},
               "out_dir": str(work)} for s, work in zip(stages, works)]
    notebook = works[0] / EXECUTED_NOTEBOOK
    error = None
    try:
        if kernel is None and kind in STEP_OF:
            step = getattr(steps, STEP_OF[kind])
            run_trials(step, trials) if kind in BATCHED else step(**trials[0])
        else:
            _run_notebook(kind, trials, notebook, kernel or kernel_name(), fresh_kernel, timeout)
        if kind == "report":
            render_html(notebook, works[0] / REPORT_HTML)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failing notebook must not stop the other stages
        error = e
    seconds = time.perf_counter() - start
    _share_notebook(works)
    # the notebook failed although no trial did (its display cells, say): nothing counts as done
    trial_failed = any((work / FAILED_FILE).is_file() for work in works)
    outcomes = []
    for stage, work in zip(stages, works):
        marked = (work / COMPLETED_FILE).is_file()
        completed = (marked and (error is None or trial_failed)) if kind in BATCHED else error is None
        (work / COMPLETED_FILE).unlink(missing_ok=True)
        if completed:
            outcomes.append(_commit(stage, work, store, seconds, len(stages)))
        else:
            failed = store.fail(work, stage.kind, stage.key)
            outcomes.append(Outcome(stage, "failed", seconds, _failure_reason(failed, error), failed / EXECUTED_NOTEBOOK))
    return outcomes


def _run_notebook(kind: str, trials: list[dict], notebook: Path, kernel: str, fresh_kernel: bool,
                  timeout: float | None) -> None:
    """The kind's notebook executed into ``notebook`` with the trials as its parameters, in this
    process's warm kernel or, with ``fresh_kernel``, in a kernel started for it; the kernel's own
    output goes to :data:`KERNEL_LOG` beside the notebook."""
    # the kernel keeps freed memory for its next tensors (see nbutils.core.malloc),
    # whatever this process was given (Dask workers: MALLOC_TRIM_THRESHOLD_=65536)
    os.environ.update(MALLOC_ENV)
    notebook_in = NOTEBOOKS / NOTEBOOK_OF[kind]
    options = dict(parameters={"trials": trials} if kind in BATCHED else trials[0], progress_bar=False,
                   log_output=False, execution_timeout=None if timeout is None else math.ceil(timeout))
    kernel_log = notebook.parent / KERNEL_LOG
    if not fresh_kernel:
        kernel_for(kernel, NOTEBOOKS).execute(notebook_in, notebook, kernel_log=kernel_log, **options)
        return
    with open(kernel_log, "w") as log_stream:
        papermill.execute_notebook(str(notebook_in), str(notebook), kernel_name=kernel, cwd=str(NOTEBOOKS),
                                   kernel_manager_class=kernel_manager_logging_to(log_stream), **options)


def _share_notebook(works: list[Path]) -> None:
    """Every artifact of an execution holds the executed notebook and the kernel's log (an
    empty log is dropped)."""
    notebook, log_file = works[0] / EXECUTED_NOTEBOOK, works[0] / KERNEL_LOG
    if log_file.is_file() and log_file.stat().st_size == 0:
        log_file.unlink()
    for work in works[1:]:
        for file in (notebook, log_file):
            if file.is_file():
                shutil.copyfile(file, work / file.name)


def _commit(stage: Stage, work: Path, store: ArtifactStore, seconds: float, stages: int) -> Outcome:
    """A completed stage committed to the store with its record; an error storing it fails this
    stage, not the run."""
    try:
        record = stage_record(stage, seconds / stages, {"stages": stages, "seconds": seconds})
        final = store.commit(work, stage.kind, stage.key, record, replace=stage.rerun)
    except Exception as e:
        log.exception("committing %s failed", stage.label)
        failed = store.fail(work, stage.kind, stage.key) if work.exists() else store.failed_path(stage.kind, stage.key)
        return Outcome(stage, "failed", seconds, f"could not store the result: {type(e).__name__}: {e}",
                       failed / EXECUTED_NOTEBOOK)
    return Outcome(stage, "ran", seconds / stages, notebook=final / EXECUTED_NOTEBOOK)


def stage_record(stage: Stage, seconds: float, execution: dict) -> dict:
    """What a stage's ``spec.json`` records beside its results: what it ran and read, its
    seconds, its execution's (``execution``: the stages that shared it, their seconds, ...) and
    where it ran (:func:`nbutils.core.device.environment`); the store adds the files' digests."""
    return {"kind": stage.kind, "label": stage.label, "spec": stage.spec, "meta": stage.meta,
            "inputs": {role: {"kind": s.kind, "key": s.key} for role, s in stage.inputs.items()},
            "seconds": seconds, "execution": execution, "environment": environment(stage.spec.get("device", "auto"))}


def kernel_manager_logging_to(log: IO[str]) -> type:
    """A kernel manager class whose kernels write their own output to ``log``.

    A kernel's process-level output is not the notebook's (cells' output reaches the notebook
    through Jupyter's messages): it is ipykernel's logging, such as the "KeyboardInterrupt
    caught in kernel" it logs at every shutdown, which users read as a failure on the console
    of a run that went well. It is kept beside the executed notebook instead."""
    class KernelManagerWithLog(jupyter_client.AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw.setdefault("stdout", log)
            kw.setdefault("stderr", log)
            return await super()._async_launch_kernel(kernel_cmd, **kw)

    return KernelManagerWithLog


def _failure_reason(folder: Path, error: Exception | None) -> str:
    """The last line of the trial's own traceback, else of the execution's error."""
    if (folder / FAILED_FILE).is_file():
        lines = (folder / FAILED_FILE).read_text().strip().splitlines()
    elif isinstance(error, TimeoutError):   # nbclient's CellTimeoutError: the message's first line says it
        first = (str(error).strip().splitlines() or ["a cell timed out"])[0].rstrip(".")
        lines = [f"not completed: {first[0].lower() + first[1:]} (a longer limit: --timeout KIND=SECONDS)"]
    elif error is not None:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        lines = ["not completed: the execution stopped (" + lines[-1] + ")"]
    else:
        lines = ["not completed: the execution ended before this trial"]
    return lines[-1] if lines else "failed"


def render_html(notebook: Path, html: Path) -> None:
    """The executed report notebook as one self-contained HTML page, without code cells."""
    config = Config()
    config.TagRemovePreprocessor.remove_cell_tags = {"remove_cell"}  # notes for notebook readers only
    config.TagRemovePreprocessor.enabled = True
    exporter = nbconvert.HTMLExporter(config=config, template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True)
    exporter.log.setLevel(logging.ERROR)
    body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
    # self-contained: the report needs no JavaScript, so drop the template's CDN scripts
    # (require.js for widgets, MathJax) rather than have the page reach the network
    body = re.sub(r'<script[^>]*src="https?://[^"]*"[^>]*>\s*</script>', "", body)
    body = re.sub(r'<script type="text/x-mathjax-config">.*?</script>', "", body, flags=re.S)
    body = body.replace("<head>", "<head>" + STAGE_BASE, 1)
    atomic_write_bytes(html, body.encode())


def default_workers() -> int:
    """One stage per CPU core this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_execution(stages: list[Stage], store: ArtifactStore, kernel: str | None, inputs: Sequence[Outcome] = (),
                  threads: int | None = None, fresh_kernel: bool = False, timeout: float | None = None) -> list[Outcome]:
    """One execution's stages, given the outcomes of the stages they read: a stage is skipped
    when one of its inputs failed (a summary instead shows what exists), reused when its
    artifact exists and is sound, else executed (all of those together, see :func:`execute`)
    under its lock, and recomputed when its artifact is damaged.

    Another writer may be computing the same stages (a second run on this outputs folder, a
    worker on another host): each stage's lock (:meth:`~nbutils.core.store.ArtifactStore.lock`)
    is taken before it runs, waiting while the other writer holds it, and a stage that writer
    completed meanwhile is reused. The inputs a stage reads are checked against their recorded
    digests first: a damaged input fails the stage, naming the file."""
    if threads:
        limit_threads(threads)
    broken_inputs = {(o.stage.kind, o.stage.key): o for o in inputs if o.status in ("failed", "skipped")}
    listed: list[Stage] = []
    decided: dict[int, Outcome] = {}   # id(stage) -> its outcome
    damaged: dict[int, str] = {}       # id(stage) -> what is wrong with its existing artifact
    for stage in stages:
        broken = {k: o for k, o in broken_inputs.items() if k in {(s.kind, s.key) for s in stage.inputs.values()}}
        if broken and stage.kind in SUMMARIES:
            stage, broken = report_without(stage, broken), {}
        listed.append(stage)
        if broken:
            decided[id(stage)] = Outcome(stage, "skipped", detail="needs " + ", ".join(o.stage.label for o in broken.values()))
        elif (reuse := _reusable(store, stage, damaged)) is not None:
            decided[id(stage)] = reuse
    todo = [s for s in listed if id(s) not in decided]
    locks = []
    try:
        for stage in sorted(todo, key=lambda s: (s.kind, s.key)):   # one order for every writer: no deadlock
            lock = store.lock(stage.kind, stage.key)
            lock.acquire(waiting=lambda holder, stage=stage: print(
                f"{stage.label}: waiting for {describe(holder)}, which is computing it", file=sys.stderr, flush=True))
            locks.append(lock)
            if (reuse := _reusable(store, stage, damaged)) is not None:   # the other writer completed it meanwhile
                decided[id(stage)] = reuse
                continue
            problem = next(filter(None, (store.damage(s.kind, s.key) for s in stage.inputs.values())), None)
            if problem:
                decided[id(stage)] = Outcome(stage, "failed", detail=f"an input is damaged: {problem}")
        runnable = [s for s in todo if id(s) not in decided]
        if runnable:
            copies = [dataclasses.replace(s, rerun=True) if id(s) in damaged else s for s in runnable]
            for stage, outcome in zip(runnable, execute(copies, store, kernel, fresh_kernel, timeout)):
                outcome.stage = stage
                if outcome.status == "ran" and id(stage) in damaged:
                    outcome.detail = "recomputed: " + damaged[id(stage)]
                decided[id(stage)] = outcome
    finally:
        for lock in locks:
            lock.release()
    return [decided[id(s)] for s in listed]


def _reusable(store: ArtifactStore, stage: Stage, damaged: dict[int, str]) -> Outcome | None:
    """The stage's "reused" outcome if its artifact exists and is sound (unless it is to be run
    again); None if it is to run, noting in ``damaged`` why an existing artifact cannot be used."""
    if stage.rerun or not store.exists(stage.kind, stage.key):
        return None
    problem = store.damage(stage.kind, stage.key)
    if problem is None:
        return Outcome(stage, "reused", notebook=store.path(stage.kind, stage.key) / EXECUTED_NOTEBOOK)
    damaged[id(stage)] = problem
    return None


def limit_threads(threads: int) -> None:
    """Give the kernels this process starts (and its own torch) ``threads`` threads, so that
    stages running side by side do not oversubscribe the cores."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def report_line(i: int, total: int, outcome: Outcome) -> str:
    if outcome.status == "ran":
        return (f"[{i}/{total}] {outcome.stage.label}: ran in {outcome.seconds:.1f} s"
                + (f" ({outcome.detail})" if outcome.detail else ""))
    return f"[{i}/{total}] {outcome.stage.label}: {outcome.status}" + (f" ({outcome.detail})" if outcome.detail else "")


def report_without(report: Stage, missing: dict[tuple[str, str], Outcome]) -> Stage:
    """The report stage restricted to the inputs that exist, listing the others with the reason
    (``missing``: (kind, key) of a stage that did not finish -> its outcome)."""
    lost = {role: missing[(s.kind, s.key)] for role, s in report.inputs.items() if (s.kind, s.key) in missing}
    reasons = {role: f"{o.status}: {o.detail or o.stage.label}" for role, o in lost.items()}
    spec = dict(report.spec)
    spec["cells"] = [c for c in report.spec["cells"] if c["role"] not in lost]
    spec["sensitivity"] = [c for c in report.spec.get("sensitivity", []) if c["role"] not in lost]
    spec["poisons"] = [c for c in report.spec.get("poisons", []) if c["role"] not in lost]
    spec["missing"] = [{**c, "reason": reasons[c["role"]]} for c in report.spec["cells"] if c["role"] in lost]
    inputs = {role: s for role, s in report.inputs.items() if role not in lost}
    return Stage(report.kind, spec, report.label, inputs, report.meta)
