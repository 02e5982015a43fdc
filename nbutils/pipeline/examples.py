"""Running a step notebook by hand: with its ``parameters`` cell left empty it takes the first
stage of its kind in a preset, with that stage's inputs found in the store, and writes into a
scratch folder."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..core.store import ArtifactStore
from . import params
from .code_versions import PROJECT_ROOT
from .stages import expand


EXAMPLE_PRESETS = ("quick", "tour")


def example_stage(kind: str, preset: str | None = None, outputs: str | Path | None = None) -> tuple[dict, dict, str]:
    """The first stage of ``kind`` in a preset, its inputs resolved in the store (they must exist:
    run ``python -m nbutils run params/<preset>`` first), and a scratch folder to write into.
    By default the preset is the quick one (``make report``'s), or the tour for the kinds the
    quick preset does not run (the defences, the metric sensitivity, the CLF surrogate)."""
    for preset in [preset] if preset else EXAMPLE_PRESETS:
        stages = [s for s in expand(params.load_preset(PROJECT_ROOT / "params" / preset)) if s.kind == kind]
        if stages:
            break
    else:
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


def example_trials(kind: str, preset: str | None = None, outputs: str | Path | None = None) -> list[dict]:
    """For running a trials notebook by hand: the first stage of ``kind`` as a list of one trial."""
    spec, inputs, out_dir = example_stage(kind, preset, outputs)
    return [{"spec": spec, "inputs": inputs, "out_dir": out_dir}]
