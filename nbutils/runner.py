"""From a preset to a report: expand the grid into stages, execute each stage's notebook
headless with papermill, reuse every artifact that exists, and summarise.

A *trial* is one path poison -> search -> retrain and ends in one accuracy. Stages:

    surrogate  00_surrogate.ipynb       CLF's surrogate ResNet-18, one per dataset and seed
    poison     01_craft_poisons.ipynb   one per (attack, budget); gradient canceling one per
                                        (algorithm, budget): it targets that algorithm's best
                                        clean run, the alpha attack the best clean DARTS run
    defend     02_defend.ipynb          one per (defence, poison set): the defended search data
    search     03_search.ipynb          one per (algorithm, condition, trial), plus random samples
    retrain    04_retrain.ipynb         one per search
    sensitivity 05_metric_sensitivity   the training-free metrics on clean vs poisoned data,
                                        one per poison set (TMLR Table 2)
    gallery    06_genotype_gallery      one: every found cell, clean beside worst poisoned
    report     99_report.ipynb          one, reading every retrain artifact

A failed stage does not stop the others; the stages that need its artifact are skipped, and
the report shows their cells as missing with the reason.

Stages are the unit of storage; *executions* are the unit of work. The trials of one
condition (the searches of one algorithm on one poison set, then their retrainings) run in
one execution of their notebook, which loops over them (parameter ``trials``): starting a
kernel and importing torch costs several seconds, paid once per condition rather than once
per trial. Every trial still gets its own artifact (with a copy of the executed notebook),
and a trial that fails does not take the others of its execution down with it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, Sequence

from . import params
from .code_versions import CODE_VERSIONS, NOTEBOOK_OF
from .data import DATA_ROOT_ENV
from .malloc import MALLOC_ENV
from .store import ArtifactStore, atomic_write_bytes, stage_key

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = PROJECT_ROOT / "notebooks"
OUTPUTS_README = PROJECT_ROOT / "outputs" / "README.md"   # what a run writes, the CSV columns among it
STEP_OF = {"surrogate": "surrogate", "poison": "craft_poisons", "search": "search", "retrain": "retrain",
           "sensitivity": "metric_sensitivity", "defend": "defend"}
SUMMARIES = ("gallery", "report")   # read many trials and show what exists when some failed
#: kinds whose trials of one condition share one notebook execution (notebook parameter ``trials``)
BATCHED = ("search", "retrain")
#: the searches that ``search.mixed_precision`` applies to (the others train in float32)
MIXED_PRECISION_ALGORITHMS = ("darts", "darts_anti", "pdarts")
EXECUTED_NOTEBOOK = "notebook.ipynb"
KERNEL_LOG = "kernel.log"   # what the notebook's kernel process printed itself (not its cells' output)
REPORT_HTML = "report.html"
#: the report links to artifacts relative to the outputs folder; its copy in the report stage's
#: own folder (two levels down) resolves them through this base, removed from outputs/report.html
STAGE_BASE = '<base href="../../">'


@dataclass(eq=False)
class Stage:
    kind: str
    spec: dict
    label: str
    inputs: dict[str, "Stage"] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)   # what the report groups by; not part of the key
    batch: str | None = None   # stages of one kind with the same batch share an execution; not in the key
    rerun: bool = False        # run even if the artifact exists, and replace it (``--rerun``); not in the key

    def __post_init__(self) -> None:
        # plain JSON types only: what papermill passes to a notebook and what the key hashes
        self.spec = json.loads(json.dumps(self.spec))

    @cached_property
    def key(self) -> str:
        return stage_key(self.kind, self.spec, {role: s.key for role, s in self.inputs.items()},
                         code=CODE_VERSIONS[self.kind])


def _percent(budget: float) -> str:
    return f"{100 * budget:g}%"


#: the algorithms whose gradient-canceling target is the converged supernet's alpha (NAS-specific
#: GC, TMLR §3.2); every other algorithm's target is the weights of its best clean architecture
SUPERNET_ALGORITHMS = ("darts", "darts_anti", "pdarts")
#: searched on clean data only: anti-search is the workshop paper's worst-case reference (Table 1)
CLEAN_ONLY = ("darts_anti",)


def expand(preset: params.Preset) -> list[Stage]:
    """Every stage of the preset, each after the stages it reads.

    First every algorithm's clean trials (the crafted attacks read them: gradient canceling
    targets the best clean run of the algorithm it attacks, the alpha attack the best clean
    DARTS run's supernets), then the poisons and the poisoned trials, then random sampling.
    """
    grid = preset.grid
    data = grid.data.model_dump()
    stages: list[Stage] = []
    by_key: dict[tuple[str, str], Stage] = {}
    cells: list[Stage] = []   # retrain stages, for the report

    def add(stage: Stage) -> Stage:
        """Append a stage once: equal stages (same kind and key) are one stage."""
        key = (stage.kind, stage.key)
        if key not in by_key:
            by_key[key] = stage
            stages.append(stage)
        return by_key[key]

    def trial(algorithm: str, entry: params.AttackEntry | None, budget: float | None, trial: int,
              poison: Stage | None, study: str = "main", search_data: dict | None = None,
              augment: bool | None = None) -> tuple[Stage, Stage]:
        """One search and its retraining. ``study``: main (the robustness table), ood (searched
        on ``search_data``, TMLR Table 3) or no_augment (search without augmentation, Table 6)."""
        seed = grid.seed + trial
        spec = {"algorithm": algorithm, "data": search_data or data, "config": preset.search.config_of(algorithm),
                "augment": preset.search.augment if augment is None else augment, "fast": preset.search.fast,
                "seed": seed, "device": preset.search.device}
        if preset.search.mixed_precision and algorithm in MIXED_PRECISION_ALGORITHMS:
            spec["mixed_precision"] = True   # only when on: the keys of float32 searches stay as they were
        if entry is None and study == "main":
            keep = supernets_to_keep(preset, algorithm)
            if keep is not None:
                spec["keep_supernets"] = keep
        condition = "clean" if entry is None else f"{entry.condition} {_percent(budget)}"
        if study == "ood":
            condition += f" searched on {search_data['dataset']}"
        elif study == "no_augment":
            condition += " without search augmentation"
        elif study.startswith("defense:"):
            condition += f" defended by {study.removeprefix('defense:')}"
        meta = {"algorithm": algorithm, "attack": "none" if entry is None else entry.condition,
                "budget": budget, "trial": trial, "study": study}
        if study == "ood":
            meta["search_dataset"] = search_data["dataset"]
        if study.startswith("defense:"):
            meta["defense"] = study.removeprefix("defense:")
        reads = {} if poison is None else {"defended" if poison.kind == "defend" else "poison": poison}
        search = add(Stage("search", spec, f"search {algorithm} {condition} trial {trial + 1}", reads, meta,
                           batch=f"{algorithm} {condition}"))
        return search, retrain_of(search, seed)

    def retrain_of(search: Stage, seed: int) -> Stage:
        spec = {"data": data, "config": preset.retrain.model_dump(exclude={"device"}), "seed": seed,
                "device": preset.retrain.device}
        stage = add(Stage("retrain", spec, f"retrain <- {search.label}", {"search": search}, dict(search.meta),
                          batch=search.batch))
        cells.append(stage)
        return stage

    clean: dict[str, list[tuple[Stage, Stage]]] = {
        algorithm: [trial(algorithm, None, None, t, None) for t in range(grid.trials)]
        for algorithm in grid.nas_algorithms
    }
    craft = preset.craft_poisons
    sensitivity: dict[tuple[str, float], Stage] = {}
    for entry in grid.attacks:
        if entry.name == "none":
            continue
        for budget in entry.budgets:
            for algorithm in grid.attacked(entry):
                if algorithm in CLEAN_ONLY:
                    continue
                spec = {"data": data, "attack": craft.attack_spec(entry.name, budget), "device": craft.device}
                inputs: dict[str, Stage] = {}
                label = f"poison {entry.condition} {_percent(budget)}"
                if entry.name == "clf":
                    inputs["surrogate"] = add(surrogate_stage(preset))
                elif entry.name == "gc":
                    spec["target"] = {"algorithm": algorithm,
                                      "kind": "alphas" if algorithm in SUPERNET_ALGORITHMS else "weights"}
                    inputs = clean_inputs(clean[algorithm])
                    label += f" against {algorithm}"
                elif entry.name == "alpha":
                    spec["ensemble"] = entry.ensemble or 1
                    inputs = clean_inputs(clean["darts"])
                meta = {"attack": entry.condition, "budget": budget}
                if entry.name == "gc":
                    meta["target"] = algorithm
                poison = add(Stage("poison", spec, label, inputs, meta))
                # one study per attack and budget (for gradient canceling: against the first algorithm)
                if preset.metric_sensitivity.run and (entry.condition, budget) not in sensitivity:
                    sensitivity[(entry.condition, budget)] = add(sensitivity_stage(preset, poison))
                for t in range(grid.trials):
                    trial(algorithm, entry, budget, t, poison)
                for defense in grid.defenses:
                    if (entry.condition in defense.attacks
                            and (defense.algorithms is None or algorithm in defense.algorithms)
                            and (defense.budgets is None or budget in defense.budgets)):
                        defended = add(defend_stage(preset, defense.name, poison))
                        for t in range(grid.trials):
                            trial(algorithm, entry, budget, t, defended, study=f"defense:{defense.name}")
                if entry.name == "gc" and algorithm in grid.augmentation_ablation:
                    for t in range(grid.trials):
                        trial(algorithm, entry, budget, t, poison, study="no_augment", augment=False)

    for algorithm in grid.augmentation_ablation:   # the clean reference of the ablation
        for t in range(grid.trials):
            trial(algorithm, None, None, t, None, study="no_augment", augment=False)
    for ood in grid.ood:
        search_data = {**data, **ood.model_dump(exclude={"algorithms"})}
        for algorithm in ood.algorithms or grid.nas_algorithms:
            for t in range(grid.trials):
                trial(algorithm, None, None, t, None, study="ood", search_data=search_data)

    for sample in range(grid.random_samples):
        seed = grid.seed + sample
        meta = {"algorithm": "random", "attack": "none", "budget": None, "trial": sample}
        search = add(Stage("search", {"algorithm": "random", "seed": seed}, f"random sample {sample + 1}", meta=meta,
                           batch="random"))
        retrain_of(search, seed)

    report_cells = [{**stage.meta, "role": f"retrain{i}"} for i, stage in enumerate(cells)]
    studies = [{**stage.meta, "role": f"sensitivity{i}"} for i, stage in enumerate(sensitivity.values())]
    poisons = [s for s in stages if s.kind == "poison"]
    shown = [{**stage.meta, "role": f"poison{i}"} for i, stage in enumerate(poisons)]
    report = Stage(
        "report",
        {"report": preset.report.model_dump(), "preset": preset.name, "cells": report_cells,
         "sensitivity": studies, "poisons": shown,
         "settings": {k: getattr(preset, k).model_dump() for k in params.PRESET_FILES}},
        "report",
        {**{f"retrain{i}": stage for i, stage in enumerate(cells)},
         **{f"sensitivity{i}": stage for i, stage in enumerate(sensitivity.values())},
         **{f"poison{i}": stage for i, stage in enumerate(poisons)}},
    )
    gallery = Stage("gallery", {"cells": report_cells, "preset": preset.name}, "genotype gallery",
                    {f"retrain{i}": stage for i, stage in enumerate(cells)})
    stages += [gallery, report]
    return stages


def supernets_to_keep(preset: params.Preset, algorithm: str) -> list[int] | None:
    """The epochs whose supernet a clean search must save for the crafted attacks, or None.

    NAS-specific gradient canceling needs the converged supernet (always saved once any epoch
    list is given); the alpha attack with an ensemble of e needs e snapshots evenly spaced
    over the search (workshop paper: e=6 is epochs 0, 10, ..., 50)."""
    from .darts import snapshot_epochs

    names = {a.name for a in preset.grid.attacks}
    keep: set[int] = set()
    wanted = "gc" in names and algorithm in SUPERNET_ALGORITHMS
    if algorithm == "darts" and "alpha" in names:
        wanted = True
        for entry in preset.grid.attacks:
            if entry.name == "alpha":
                keep.update(snapshot_epochs(preset.search.darts.epochs, entry.ensemble or 1))
    return sorted(keep) if wanted else None


def defend_stage(preset: params.Preset, name: str, poison: Stage) -> Stage:
    spec = {"data": preset.grid.data.model_dump(), "defense": preset.defend.defense_spec(name),
            "device": preset.defend.device}
    return Stage("defend", spec, f"defend with {name} against {poison.label.removeprefix('poison ')}",
                 {"poison": poison}, {**poison.meta, "defense": name})


def sensitivity_stage(preset: params.Preset, poison: Stage) -> Stage:
    spec = {"data": preset.grid.data.model_dump(), "config": preset.metric_sensitivity.model_dump(exclude={"run", "device"}),
            "device": preset.metric_sensitivity.device}
    return Stage("sensitivity", spec, f"metric sensitivity to {poison.label.removeprefix('poison ')}",
                 {"poison": poison}, dict(poison.meta))


def surrogate_stage(preset: params.Preset) -> Stage:
    spec = {"data": preset.grid.data.model_dump(), "config": preset.craft_poisons.surrogate.model_dump(),
            "seed": preset.craft_poisons.seed, "device": preset.craft_poisons.device}
    return Stage("surrogate", spec, "surrogate ResNet-18 for CLF")


def clean_inputs(runs: list[tuple[Stage, Stage]]) -> dict[str, Stage]:
    """The clean trials of one algorithm as inputs: search0, retrain0, search1, ..."""
    inputs = {}
    for i, (search, retrain) in enumerate(runs):
        inputs[f"search{i}"], inputs[f"retrain{i}"] = search, retrain
    return inputs


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
    from jupyter_client.kernelspec import KernelSpecManager

    return "nbutils" if "nbutils" in KernelSpecManager().find_kernel_specs() else "python3"


def preflight(preset: params.Preset) -> None:
    """Everything that can be checked before compute: data present, graphviz installed."""
    from .data import load_dataset

    data = preset.grid.data
    for dataset in [data.dataset, *(ood.dataset for ood in preset.grid.ood)]:
        for split in ("train", "test"):
            load_dataset(dataset, split, data.data_root, data.download)
    if shutil.which("dot") is None:
        raise RuntimeError(
            "graphviz's `dot` program was not found; the report draws cells with it. "
            "Install it with `sudo apt-get install graphviz` (or `conda install graphviz`)."
        )


def executions(stages: list[Stage]) -> list[list[Stage]]:
    """The stages grouped into executions (see the module docstring), each after the
    executions it reads from; a stage outside :data:`BATCHED` or without a batch is alone."""
    groups: dict[tuple, list[Stage]] = {}
    for stage in stages:
        group = (stage.kind, stage.batch) if stage.kind in BATCHED and stage.batch else (stage.kind, id(stage))
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


def execute(stages: list[Stage], store: ArtifactStore, kernel: str | None) -> list[Outcome]:
    """Run stages of one kind in one execution, each into a private folder; commit each one
    that completed, keep each other one as failed.

    With a kernel the stages' notebook runs under papermill (the executed notebook is part of
    every artifact); with ``kernel=None`` the step functions run in this process (no notebook:
    faster, for tests and debugging). The gallery and the report always run as notebooks.
    Kinds in :data:`BATCHED` take the list ``trials`` and mark each trial that completed
    (:func:`nbutils.steps.run_trials`); the others take one stage's ``spec``, ``inputs`` and
    ``out_dir``."""
    import papermill

    from . import steps

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
            steps.run_trials(step, trials) if kind in BATCHED else step(**trials[0])
        else:
            # the kernel keeps freed memory for its next tensors (see nbutils.malloc),
            # whatever this process was given (Dask workers: MALLOC_TRIM_THRESHOLD_=65536)
            os.environ.update(MALLOC_ENV)
            with open(works[0] / KERNEL_LOG, "w") as kernel_log:
                papermill.execute_notebook(
                    str(NOTEBOOKS / NOTEBOOK_OF[kind]), str(notebook),
                    parameters={"trials": trials} if kind in BATCHED else trials[0],
                    kernel_name=kernel or kernel_name(), progress_bar=False, log_output=False, cwd=str(NOTEBOOKS),
                    kernel_manager_class=kernel_manager_logging_to(kernel_log),
                )
        if kind == "report":
            render_html(notebook, works[0] / REPORT_HTML)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failing notebook must not stop the other stages
        error = e
    seconds = time.perf_counter() - start
    log_file = works[0] / KERNEL_LOG
    if log_file.is_file() and log_file.stat().st_size == 0:
        log_file.unlink()
    for work in works[1:]:   # every artifact holds the executed notebook (and the kernel's log)
        for file in (notebook, log_file):
            if file.is_file():
                shutil.copyfile(file, work / file.name)
    # the notebook failed although no trial did (its display cells, say): nothing counts as done
    trial_failed = any((work / steps.FAILED_FILE).is_file() for work in works)
    outcomes = []
    for stage, work in zip(stages, works):
        marked = (work / steps.COMPLETED_FILE).is_file()
        completed = (marked and (error is None or trial_failed)) if kind in BATCHED else error is None
        (work / steps.COMPLETED_FILE).unlink(missing_ok=True)
        if not completed:
            failed = store.fail(work, stage.kind, stage.key)
            outcomes.append(Outcome(stage, "failed", seconds, _failure_reason(failed, error), failed / EXECUTED_NOTEBOOK))
            continue
        record = {"kind": stage.kind, "label": stage.label, "spec": stage.spec, "meta": stage.meta,
                  "inputs": {role: {"kind": s.kind, "key": s.key} for role, s in stage.inputs.items()},
                  "seconds": seconds / len(stages), "execution": {"stages": len(stages), "seconds": seconds}}
        final = store.commit(work, stage.kind, stage.key, record, replace=stage.rerun)
        outcomes.append(Outcome(stage, "ran", seconds / len(stages), notebook=final / EXECUTED_NOTEBOOK))
    return outcomes


def kernel_manager_logging_to(log: IO[str]) -> type:
    """A kernel manager class whose kernels write their own output to ``log``.

    A kernel's process-level output is not the notebook's (cells' output reaches the notebook
    through Jupyter's messages): it is ipykernel's logging, such as the "KeyboardInterrupt
    caught in kernel" it logs at every shutdown, which users read as a failure on the console
    of a run that went well. It is kept beside the executed notebook instead."""
    from jupyter_client.manager import AsyncKernelManager

    class KernelManagerWithLog(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw.setdefault("stdout", log)
            kw.setdefault("stderr", log)
            return await super()._async_launch_kernel(kernel_cmd, **kw)

    return KernelManagerWithLog


def _failure_reason(folder: Path, error: Exception | None) -> str:
    """The last line of the trial's own traceback, else of the execution's error."""
    from .steps import FAILED_FILE

    if (folder / FAILED_FILE).is_file():
        lines = (folder / FAILED_FILE).read_text().strip().splitlines()
    elif error is not None:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        lines = ["not completed: the execution stopped (" + lines[-1] + ")"]
    else:
        lines = ["not completed: the execution ended before this trial"]
    return lines[-1] if lines else "failed"


def render_html(notebook: Path, html: Path) -> None:
    """The executed report notebook as one self-contained HTML page, without code cells."""
    import nbformat
    from nbconvert import HTMLExporter

    from traitlets.config import Config

    config = Config()
    config.TagRemovePreprocessor.remove_cell_tags = {"remove_cell"}  # notes for notebook readers only
    config.TagRemovePreprocessor.enabled = True
    exporter = HTMLExporter(config=config, template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True)
    exporter.log.setLevel(logging.ERROR)
    body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
    # self-contained: the report needs no JavaScript, so drop the template's CDN scripts
    # (require.js for widgets, MathJax) rather than have the page reach the network
    body = re.sub(r'<script[^>]*src="https?://[^"]*"[^>]*>\s*</script>', "", body)
    body = re.sub(r'<script type="text/x-mathjax-config">.*?</script>', "", body, flags=re.S)
    body = body.replace("<head>", "<head>" + STAGE_BASE, 1)
    atomic_write_bytes(html, body.encode())


def publish_report(stage: Path, outputs: Path) -> Path:
    """The report stage's page as ``outputs/report.html``, its links relative to ``outputs``,
    with the results as data beside it (``trials.csv``, ``cells.csv``, and ``README.md``, which
    describes them, when the folder has none)."""
    from .report import CELLS_CSV, TRIALS_CSV

    outputs = Path(outputs)
    target = outputs / REPORT_HTML
    atomic_write_bytes(target, (stage / REPORT_HTML).read_text().replace(STAGE_BASE, "", 1).encode())
    for name in (TRIALS_CSV, CELLS_CSV):
        if (stage / name).is_file():
            atomic_write_bytes(outputs / name, (stage / name).read_bytes())
    if OUTPUTS_README.is_file() and not (outputs / OUTPUTS_README.name).exists():
        atomic_write_bytes(outputs / OUTPUTS_README.name, OUTPUTS_README.read_bytes())
    return target


def run(preset_dir: str | Path, outputs: str | Path = "outputs", only: str | None = None,
        dry_run: bool = False, inline: bool = False, workers: int | None = None, scheduler: str | None = None,
        rerun: Sequence[str] = (), out=sys.stdout) -> list[Outcome]:
    """Validate, check, then execute every stage not already in the store.

    ``workers``: stages run at once on a local Dask cluster (default: one per CPU core; 1 runs
    them one after another in this process without Dask); ``scheduler``: the address of an
    existing Dask cluster to run them on instead. ``inline``: the steps in the executing
    process instead of their notebooks, see :func:`execute`. ``rerun``: kinds of stage to run
    again although their artifacts exist, with every stage that reads them (each new artifact
    replaces the old one once complete).

    ``outputs`` is taken relative to the caller's working directory and made absolute before
    anything reads it: every path handed to a notebook is absolute, since its kernel runs in
    ``notebooks/``."""
    outputs = Path(outputs).resolve()
    if os.environ.get(DATA_ROOT_ENV):   # the kernels inherit it, in another working directory
        os.environ[DATA_ROOT_ENV] = str(Path(os.environ[DATA_ROOT_ENV]).expanduser().resolve())
    preset = params.load_preset(preset_dir)
    stages = expand(preset)
    if only is not None:
        if only not in NOTEBOOK_OF:
            raise params.ParamsError(f"--only {only!r} is not a stage; allowed: {', '.join(NOTEBOOK_OF)}")
        wanted = {id(s) for s in stages if s.kind == only}
        stages = [s for s in stages if id(s) in wanted or _needed_by(s, stages, wanted)]
    if workers is not None and workers < 1:
        raise params.ParamsError(f"--workers must be >= 1, got {workers}")
    unknown = sorted(set(rerun) - set(NOTEBOOK_OF))
    if unknown:
        raise params.ParamsError(f"--rerun {', '.join(unknown)}: not a kind of stage; allowed: {', '.join(NOTEBOOK_OF)}")
    mark_reruns(stages, set(rerun))
    store = ArtifactStore(outputs)
    if dry_run:
        for s in stages:
            state = "rerun" if s.rerun else "exists" if store.exists(s.kind, s.key) else "to run"
            print(f"{s.kind:9s} {s.key}  {state:7s} {s.label}", file=out)
        return []
    preflight(preset)
    store.clean_partial()
    os.environ["NBUTILS_HEADLESS"] = "1"
    kernel = None if inline else kernel_name()
    workers = workers or default_workers()
    started = time.perf_counter()
    if scheduler is None and workers == 1:
        outcomes = _run_here(stages, store, kernel, out)
    else:
        from .cluster import run_on_dask

        outcomes = run_on_dask(stages, store, kernel, workers=workers, scheduler=scheduler, out=out)
    for outcome in outcomes:
        if outcome.stage.kind == "report" and outcome.status in ("ran", "reused"):
            publish_report(store.path("report", outcome.stage.key), outputs)
    print_summary(outcomes, time.perf_counter() - started, outputs, out)
    return outcomes


def mark_reruns(stages: list[Stage], kinds: set[str]) -> None:
    """Mark the stages of ``kinds`` and every stage that reads one of them (stages come after
    their inputs) to run again."""
    for stage in stages:
        stage.rerun = stage.kind in kinds or any(s.rerun for s in stage.inputs.values())


def default_workers() -> int:
    """One stage per CPU core this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_execution(stages: list[Stage], store: ArtifactStore, kernel: str | None, inputs: Sequence[Outcome] = (),
                  threads: int | None = None) -> list[Outcome]:
    """One execution's stages, given the outcomes of the stages they read: a stage is skipped
    when one of its inputs failed (a summary instead shows what exists), reused when its
    artifact exists, else executed (all of those together, see :func:`execute`)."""
    if threads:
        limit_threads(threads)
    broken_inputs = {(o.stage.kind, o.stage.key): o for o in inputs if o.status in ("failed", "skipped")}
    outcomes: list[Outcome | None] = []
    todo = []
    for stage in stages:
        broken = {k: o for k, o in broken_inputs.items() if k in {(s.kind, s.key) for s in stage.inputs.values()}}
        if broken and stage.kind in SUMMARIES:
            stage, broken = report_without(stage, broken), {}
        if broken:
            outcomes.append(Outcome(stage, "skipped", detail="needs " + ", ".join(o.stage.label for o in broken.values())))
        elif store.exists(stage.kind, stage.key) and not stage.rerun:
            outcomes.append(Outcome(stage, "reused", notebook=store.path(stage.kind, stage.key) / EXECUTED_NOTEBOOK))
        else:
            outcomes.append(None)
            todo.append(stage)
    ran = iter(execute(todo, store, kernel) if todo else [])
    return [outcome if outcome is not None else next(ran) for outcome in outcomes]


def limit_threads(threads: int) -> None:
    """Give the kernels this process starts (and its own torch) ``threads`` threads, so that
    stages running side by side do not oversubscribe the cores."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def report_line(i: int, total: int, outcome: Outcome) -> str:
    if outcome.status == "ran":
        return f"[{i}/{total}] {outcome.stage.label}: ran in {outcome.seconds:.1f} s"
    return f"[{i}/{total}] {outcome.stage.label}: {outcome.status}" + (f" ({outcome.detail})" if outcome.detail else "")


def _run_here(stages: list[Stage], store: ArtifactStore, kernel: str | None, out) -> list[Outcome]:
    """Every execution in order, in this process; outcomes in stage order."""
    outcomes: dict[int, Outcome] = {}
    done = 0
    for group in executions(stages):
        todo = [s.label for s in group if s.rerun or not store.exists(s.kind, s.key)]
        if todo:
            print(f"[{done + 1}/{len(stages)}] {'; '.join(todo)} ...", file=out, flush=True)
        inputs = [outcomes[id(s)] for stage in group for s in stage.inputs.values()]
        for stage, outcome in zip(group, run_execution(group, store, kernel, inputs)):
            outcomes[id(stage)] = outcome
            done += 1
            print(report_line(done, len(stages), outcome), file=out, flush=True)
    return [outcomes[id(s)] for s in stages]


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


def _needed_by(stage: Stage, stages: list[Stage], wanted: set[int]) -> bool:
    """Whether ``stage`` is an (indirect) input of a wanted stage."""
    def reads(s: Stage) -> bool:
        return any(inp is stage or reads(inp) for inp in s.inputs.values())
    return any(reads(s) for s in stages if id(s) in wanted)


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


def example(kind: str, preset: str = "quick", outputs: str | Path | None = None) -> tuple[dict, dict, str]:
    """The first stage of ``kind`` in a preset, for running a step notebook by hand."""
    import tempfile

    preset_spec = params.load_preset(PROJECT_ROOT / "params" / preset)
    stages = [s for s in expand(preset_spec) if s.kind == kind]
    if not stages:
        raise ValueError(f"preset {preset!r} has no {kind!r} stage")
    stage = next((s for s in stages if s.inputs), stages[0]) if kind != "report" else stages[0]
    store = ArtifactStore(outputs or PROJECT_ROOT / "outputs")
    missing = [s.label for s in stage.inputs.values() if not store.exists(s.kind, s.key)]
    if missing:
        raise FileNotFoundError(
            f"this {kind} stage reads artifacts that do not exist yet ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); run `python -m nbutils run params/{preset}` first"
        )
    scratch = Path(tempfile.mkdtemp(prefix=f"nbutils-{kind}-"))
    return stage.spec, {role: str(store.path(s.kind, s.key)) for role, s in stage.inputs.items()}, str(scratch)
