"""From a preset to a report: expand the grid into stages, execute each stage's notebook
headless with papermill, reuse every artifact that exists, and summarise.

A *trial* is one path poison -> search -> retrain and ends in one accuracy. Stages:

    poison   01_craft_poisons.ipynb   one per (attack, budget)
    search   03_search.ipynb          one per (algorithm, condition, trial), plus random samples
    retrain  04_retrain.ipynb         one per search
    report   99_report.ipynb          one, reading every retrain artifact

A failed stage does not stop the others; the stages that need its artifact are skipped, and
the report shows their cells as missing with the reason.
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

from . import params
from .store import ArtifactStore, atomic_write_bytes, stage_key

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = PROJECT_ROOT / "notebooks"
NOTEBOOK_OF = {
    "poison": "01_craft_poisons.ipynb",
    "search": "03_search.ipynb",
    "retrain": "04_retrain.ipynb",
    "report": "99_report.ipynb",
}
EXECUTED_NOTEBOOK = "notebook.ipynb"
REPORT_HTML = "report.html"


@dataclass(eq=False)
class Stage:
    kind: str
    spec: dict
    label: str
    inputs: dict[str, "Stage"] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)   # what the report groups by; not part of the key

    def __post_init__(self) -> None:
        # plain JSON types only: what papermill passes to a notebook and what the key hashes
        self.spec = json.loads(json.dumps(self.spec))

    @cached_property
    def key(self) -> str:
        return stage_key(self.kind, self.spec, {role: s.key for role, s in self.inputs.items()})


def _percent(budget: float) -> str:
    return f"{100 * budget:g}%"


def expand(preset: params.Preset) -> list[Stage]:
    """Every stage of the preset, each after the stages it reads."""
    grid = preset.grid
    data = grid.data.model_dump()
    stages: list[Stage] = []
    cells: list[tuple[dict, Stage]] = []   # (meta, retrain stage) for the report

    def retrain_of(search: Stage, trial_seed: int) -> Stage:
        spec = {"data": data, "config": preset.retrain.model_dump(exclude={"device"}), "seed": trial_seed,
                "device": preset.retrain.device}
        stage = Stage("retrain", spec, f"retrain <- {search.label}", {"search": search}, dict(search.meta))
        stages.append(stage)
        cells.append((stage.meta, stage))
        return stage

    conditions: list[tuple[str, float | None, Stage | None]] = []
    for attack in grid.attacks:
        if attack.name == "none":
            conditions.append(("none", None, None))
            continue
        for budget in attack.budgets:
            spec = {
                "data": data,
                "attack": {"name": attack.name, "budget": budget, "seed": preset.craft_poisons.seed,
                           "eps": preset.craft_poisons.eps, "sigma": preset.craft_poisons.sigma},
            }
            stage = Stage("poison", spec, f"poison {attack.name} {_percent(budget)}",
                          meta={"attack": attack.name, "budget": budget})
            stages.append(stage)
            conditions.append((attack.name, budget, stage))

    for algorithm in grid.nas_algorithms:
        for attack, budget, poison_stage in conditions:
            for trial in range(grid.trials):
                seed = grid.seed + trial
                spec = {"algorithm": algorithm, "data": data, "config": preset.search.darts.model_dump(),
                        "augment": preset.search.augment, "seed": seed, "device": preset.search.device}
                condition = "clean" if attack == "none" else f"{attack} {_percent(budget)}"
                meta = {"algorithm": algorithm, "attack": attack, "budget": budget, "trial": trial}
                search = Stage("search", spec, f"search {algorithm} {condition} trial {trial + 1}",
                               {"poison": poison_stage} if poison_stage else {}, meta)
                stages.append(search)
                retrain_of(search, seed)

    for sample in range(grid.random_samples):
        seed = grid.seed + sample
        meta = {"algorithm": "random", "attack": "none", "budget": None, "trial": sample}
        search = Stage("search", {"algorithm": "random", "seed": seed}, f"random sample {sample + 1}", meta=meta)
        stages.append(search)
        retrain_of(search, seed)

    report_cells = [{**meta, "role": f"retrain{i}"} for i, (meta, _) in enumerate(cells)]
    report = Stage(
        "report",
        {"report": preset.report.model_dump(), "preset": preset.name, "cells": report_cells,
         "settings": {k: getattr(preset, k).model_dump() for k in params.PRESET_FILES}},
        "report",
        {f"retrain{i}": stage for i, (_, stage) in enumerate(cells)},
    )
    stages.append(report)
    return stages


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
    for split in ("train", "test"):
        load_dataset(data.dataset, split, data.data_root, data.download)
    if shutil.which("dot") is None:
        raise RuntimeError(
            "graphviz's `dot` program was not found; the report draws cells with it. "
            "Install it with `sudo apt-get install graphviz` (or `conda install graphviz`)."
        )


def execute_stage(stage: Stage, store: ArtifactStore, kernel: str) -> Outcome:
    """Run one stage's notebook into a private folder and commit it, or keep it as failed."""
    import papermill

    start = time.perf_counter()
    work = store.begin(stage.kind, stage.key)
    notebook = work / EXECUTED_NOTEBOOK
    parameters = {
        "spec": stage.spec,
        "inputs": {role: str(store.path(s.kind, s.key)) for role, s in stage.inputs.items()},
        "out_dir": str(work),
    }
    try:
        papermill.execute_notebook(
            str(NOTEBOOKS / NOTEBOOK_OF[stage.kind]), str(notebook), parameters=parameters,
            kernel_name=kernel, progress_bar=False, log_output=False, cwd=str(NOTEBOOKS),
        )
        if stage.kind == "report":
            render_html(notebook, work / REPORT_HTML)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failing notebook must not stop the other trials
        failed = store.fail(work, stage.kind, stage.key)
        reason = str(e).strip().splitlines()
        return Outcome(stage, "failed", time.perf_counter() - start,
                       reason[-1] if reason else type(e).__name__, failed / EXECUTED_NOTEBOOK)
    seconds = time.perf_counter() - start
    record = {"kind": stage.kind, "label": stage.label, "spec": stage.spec, "meta": stage.meta,
              "inputs": {role: {"kind": s.kind, "key": s.key} for role, s in stage.inputs.items()},
              "seconds": seconds}
    final = store.commit(work, stage.kind, stage.key, record)
    return Outcome(stage, "ran", seconds, notebook=final / EXECUTED_NOTEBOOK)


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
    atomic_write_bytes(html, body.encode())


def run(preset_dir: str | Path, outputs: str | Path = "outputs", only: str | None = None,
        dry_run: bool = False, out=sys.stdout) -> list[Outcome]:
    """Validate, check, then execute every stage not already in the store."""
    preset = params.load_preset(preset_dir)
    stages = expand(preset)
    if only is not None:
        if only not in NOTEBOOK_OF:
            raise params.ParamsError(f"--only {only!r} is not a stage; allowed: {', '.join(NOTEBOOK_OF)}")
        wanted = {id(s) for s in stages if s.kind == only}
        stages = [s for s in stages if id(s) in wanted or _needed_by(s, stages, wanted)]
    store = ArtifactStore(outputs)
    if dry_run:
        for s in stages:
            state = "exists" if store.exists(s.kind, s.key) else "to run"
            print(f"{s.kind:8s} {s.key}  {state:7s} {s.label}", file=out)
        return []
    preflight(preset)
    store.clean_partial()
    os.environ["NBUTILS_HEADLESS"] = "1"
    kernel = kernel_name()

    outcomes: dict[int, Outcome] = {}
    total = len(stages)
    started = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        broken = [s for s in stage.inputs.values() if outcomes[id(s)].status in ("failed", "skipped")]
        if broken and stage.kind == "report":  # the report shows what exists and says what is missing
            stage, broken = report_without(stage, {id(s): outcomes[id(s)] for s in broken}), []
        if broken:
            outcome = Outcome(stage, "skipped", detail="needs " + ", ".join(s.label for s in broken))
        elif store.exists(stage.kind, stage.key):
            outcome = Outcome(stage, "reused", notebook=store.path(stage.kind, stage.key) / EXECUTED_NOTEBOOK)
        else:
            print(f"[{i}/{total}] {stage.label} ...", file=out, flush=True)
            outcome = execute_stage(stage, store, kernel)
        outcomes[id(stage)] = outcome
        if outcome.status != "ran":
            print(f"[{i}/{total}] {stage.label}: {outcome.status}" + (f" ({outcome.detail})" if outcome.detail else ""),
                  file=out, flush=True)
        else:
            print(f"[{i}/{total}] {stage.label}: ran in {outcome.seconds:.1f} s", file=out, flush=True)
        if stage.kind == "report" and outcome.status in ("ran", "reused"):
            shutil.copyfile(store.path("report", stage.key) / REPORT_HTML, Path(outputs) / REPORT_HTML)
    results = list(outcomes.values())
    print_summary(results, time.perf_counter() - started, Path(outputs), out)
    return results


def report_without(report: Stage, missing: dict[int, Outcome]) -> Stage:
    """The report stage restricted to the inputs that exist, listing the others with the reason."""
    roles = {role for role, s in report.inputs.items() if id(s) in missing}
    reasons = {role: f"{missing[id(s)].status}: {missing[id(s)].detail or s.label}"
               for role, s in report.inputs.items() if role in roles}
    spec = dict(report.spec)
    spec["cells"] = [c for c in report.spec["cells"] if c["role"] not in roles]
    spec["missing"] = [{**c, "reason": reasons[c["role"]]} for c in report.spec["cells"] if c["role"] in roles]
    inputs = {role: s for role, s in report.inputs.items() if role not in roles}
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
