"""Running a notebook by hand: with its ``parameters`` cell left as it is (no ``spec``, no
``trials``), a step notebook takes a stage of its kind from a preset, computes the stages that
stage reads, and writes into a scratch folder. "Run All" then works in a fresh clone with nothing
computed, in JupyterLab (cwd ``notebooks/``) as in the tests.

* The preset is the notebook's ``preset`` parameter: by default ``lesson`` (``params/lesson``:
  scikit-learn's 8x8 digits, a few dozen search images, every kind of stage computed in seconds),
  or any other preset of ``params/`` (``tour``, ``quick``) for a class that wants real accuracy.
  A kind the preset does not run (the lesson's CLF surrogate and defences) is taken from
  :data:`FALLBACK_PRESET`.
* The stages the example reads are taken from the user's store (``outputs/``) when a run of that
  preset computed all of them there; otherwise they are computed, in this process (the step
  functions, no notebooks), into the scratch store, :func:`scratch_folder` (a folder of the
  system's temporary directory, or ``$NBUTILS_SCRATCH``). The user's ``outputs/`` is only ever
  read: a later ``make report`` finds it as it left it. The scratch store is content-addressed
  like ``outputs/`` (same stage keys), so the notebooks run after one another reuse what the
  earlier ones computed there.
* Each notebook's own stage writes into a fresh folder of the scratch folder.

None of this runs when the pipeline executes a notebook: it injects ``spec``, ``inputs`` and
``out_dir`` (or ``trials``), and the notebooks call this module only when those are empty
(``code_versions.BY_HAND_ONLY``: it is not part of any stage's code).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from ..core.store import ArtifactStore
from . import params, steps
from .execution import STEP_OF, stage_record
from .code_versions import PROJECT_ROOT
from .stages import Stage, expand

#: the preset of a notebook run by hand unless its ``preset`` parameter says otherwise
LESSON_PRESET = "lesson"
#: the preset whose stage a notebook takes when its preset has none of its kind (the lesson has no
#: CLF surrogate and no defence: with them its report took too long to compute from nothing)
FALLBACK_PRESET = "tour"
#: where the scratch store and the notebooks' own stage folders go (default: a folder of the temp dir)
SCRATCH_ENV = "NBUTILS_SCRATCH"
#: where a notebook run by hand looks for a run's artifacts (default: the project's ``outputs/``)
OUTPUTS_ENV = "NBUTILS_OUTPUTS"
#: the kinds whose notebooks read every trial of the preset
SUMMARY_KINDS = ("gallery", "report")


def scratch_folder() -> Path:
    """The folder a notebook run by hand writes into: ``$NBUTILS_SCRATCH``, else
    ``nbutils-notebooks`` in the system's temporary directory. Never ``outputs/``: the stages
    computed here come from steps run without their notebooks, which the report links to."""
    folder = Path(os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / "nbutils-notebooks")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def user_outputs(outputs: str | Path | None = None) -> Path:
    """The store a notebook run by hand reads (never writes): ``outputs``, else ``$NBUTILS_OUTPUTS``
    (the notebook tests point it at an empty folder), else the project's ``outputs/``."""
    return Path(outputs or os.environ.get(OUTPUTS_ENV) or PROJECT_ROOT / "outputs")


def preset_stages(preset: str | Path = LESSON_PRESET) -> list[Stage]:
    """Every stage of a preset, named as a folder of ``params/`` (``"lesson"``) or given as a path."""
    path = Path(preset)
    if not path.is_dir():
        path = PROJECT_ROOT / "params" / str(preset)
    return expand(params.load_preset(path))


def upstream(stage: Stage) -> list[Stage]:
    """The stages ``stage`` reads, transitively, each once, each after the stages it reads."""
    ordered: list[Stage] = []
    seen: set[tuple[str, str]] = set()

    def visit(s: Stage) -> None:
        for inp in s.inputs.values():
            if (inp.kind, inp.key) not in seen:
                seen.add((inp.kind, inp.key))
                visit(inp)
                ordered.append(inp)

    visit(stage)
    return ordered


def choose_stage(stages: list[Stage], kind: str, prefer: dict | None = None,
                 stores: tuple[ArtifactStore, ...] = ()) -> Stage:
    """The stage of ``kind`` a notebook shows by hand: of those whose ``meta`` matches ``prefer``
    (all of them when none does), one that reads inputs (a poisoned search rather than a clean
    one) and, among those, the one with the fewest stages still to compute in ``stores``
    (ties: the first of the preset)."""
    candidates = [s for s in stages if s.kind == kind]
    if not candidates:
        raise ValueError(f"the preset has no {kind!r} stage; choose another preset")
    if prefer:
        matching = [s for s in candidates if all(s.meta.get(k) == v for k, v in prefer.items())]
        candidates = matching or candidates
    if kind not in SUMMARY_KINDS:
        candidates = [s for s in candidates if s.inputs] or candidates

    def missing(stage: Stage) -> int:
        return sum(not any(store.exists(s.kind, s.key) for store in stores) for s in upstream(stage))

    return min(candidates, key=missing)


def compute_stage(stage: Stage, store: ArtifactStore, inputs: dict[str, str]) -> Path:
    """Run ``stage``'s step function in this process and commit its artifact to ``store``,
    recorded as the runner records it (``spec.json``), so that the steps reading it find what
    they expect (a crafted attack reads its target's retrain record, the report its cells')."""
    work = store.begin(stage.kind, stage.key)
    start = time.perf_counter()
    try:
        getattr(steps, STEP_OF[stage.kind])(stage.spec, inputs, work)
    except BaseException:
        store.fail(work, stage.kind, stage.key)
        raise
    seconds = time.perf_counter() - start
    return store.commit(work, stage.kind, stage.key, stage_record(stage, seconds, {"stages": 1, "seconds": seconds, "by_hand": True}))


def ensure_inputs(stage: Stage, outputs: str | Path | None = None, log=print) -> dict[str, str]:
    """The artifact folders of the stages ``stage`` reads, role -> path: all from ``outputs``
    (default: the project's ``outputs/``) when a run computed every one of them there, else all
    from the scratch store, computing there the ones it lacks (the report and the gallery find a
    retraining's search beside it, so the two stores are never mixed)."""
    needed = upstream(stage)
    user = ArtifactStore(user_outputs(outputs))
    if all(user.exists(s.kind, s.key) for s in needed):
        store = user
    else:
        store = ArtifactStore(scratch_folder() / "store")
        todo = [s for s in needed if not store.exists(s.kind, s.key)]
        if todo:
            log(f"Computing the {len(todo)} stage(s) this {stage.kind} stage reads into {store.root} "
                "(reused on the next run):")
        for i, s in enumerate(todo, 1):
            start = time.perf_counter()
            compute_stage(s, store, {role: str(store.path(i.kind, i.key)) for role, i in s.inputs.items()})
            log(f"  [{i}/{len(todo)}] {s.label}: {time.perf_counter() - start:.1f} s")
    return {role: str(store.path(s.kind, s.key)) for role, s in stage.inputs.items()}


def stage_artifact(stage: Stage, outputs: str | Path | None = None, log=print) -> Path:
    """The artifact folder of ``stage`` itself, for a notebook that walks several stages (the
    tour): the user's when a run computed it in ``outputs``, else the scratch store's, computed
    there (after the stages it reads, :func:`ensure_inputs`) if need be."""
    user = ArtifactStore(user_outputs(outputs))
    if user.exists(stage.kind, stage.key):
        return user.path(stage.kind, stage.key)
    store = ArtifactStore(scratch_folder() / "store")
    if not store.exists(stage.kind, stage.key):
        inputs = ensure_inputs(stage, outputs, log)
        start = time.perf_counter()
        compute_stage(stage, store, inputs)
        log(f"{stage.label}: {time.perf_counter() - start:.1f} s")
    return store.path(stage.kind, stage.key)


def example_stage(kind: str, preset: str | Path | None = None, outputs: str | Path | None = None,
                  prefer: dict | None = None, log=print) -> tuple[dict, dict, str]:
    """A stage of ``kind`` for a notebook run by hand: its spec, its inputs (computed if need
    be, see :func:`ensure_inputs`) and a fresh folder of the scratch folder to write into.

    ``preset``: a folder of ``params/`` or a path (default :data:`LESSON_PRESET`); ``prefer``:
    stage metadata to pick the stage by (``{"attack": "gc"}``), see :func:`choose_stage`. At the
    lesson's size the networks are tiny and run fastest on one thread, the more so on a shared
    machine, so torch is given one."""
    preset = preset or LESSON_PRESET
    if str(preset) == LESSON_PRESET:
        torch.set_num_threads(1)
    stages = preset_stages(preset)
    if not any(s.kind == kind for s in stages):
        log(f"The {preset} preset has no {kind} stage: taking one from params/{FALLBACK_PRESET}.")
        stages = preset_stages(FALLBACK_PRESET)
    stores = (ArtifactStore(user_outputs(outputs)), ArtifactStore(scratch_folder() / "store"))
    stage = choose_stage(stages, kind, prefer, stores)
    inputs = ensure_inputs(stage, outputs, log)
    out_dir = tempfile.mkdtemp(prefix=f"{kind}-", dir=scratch_folder())
    return stage.spec, inputs, out_dir


def example_trials(kind: str, preset: str | Path | None = None, outputs: str | Path | None = None,
                   prefer: dict | None = None, log=print) -> list[dict]:
    """For running a trials notebook (search, retrain) by hand: :func:`example_stage` as a list of one trial."""
    spec, inputs, out_dir = example_stage(kind, preset, outputs, prefer, log)
    return [{"spec": spec, "inputs": inputs, "out_dir": out_dir}]
