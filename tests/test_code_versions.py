"""Stage keys follow the code: a changed step must bump its kind's version, and a bump
recomputes exactly the stages of that kind and those that read them."""
import json
import shutil
from pathlib import Path

import pytest

from nbutils.pipeline import code_versions
from nbutils.pipeline.stages import expand, mark_reruns
from nbutils.pipeline.params import load_preset

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "tests" / "code_digests.json"


def test_code_changes_come_with_a_version_bump():
    recorded = json.loads(RECORD.read_text())
    assert set(recorded) == set(code_versions.CODE_VERSIONS) == set(code_versions.NOTEBOOK_OF)
    stale = [kind for kind, now in code_versions.current_digests().items()
             if now["digest"] != recorded[kind]["digest"] and now["version"] <= recorded[kind]["version"]]
    assert not stale, (
        f"the code of the {', '.join(stale)} stages changed since tests/code_digests.json was written. "
        "If what they compute changed, bump CODE_VERSIONS in nbutils/pipeline/code_versions.py (their artifacts are then "
        "recomputed); either way record the new digests: python -m nbutils code-digests --write")
    behind = [kind for kind, now in code_versions.current_digests().items()
              if now["version"] != recorded[kind]["version"]]
    assert not behind, f"record the bumped versions of {behind}: python -m nbutils code-digests --write"


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """The package and notebooks copied, for editing, with code_versions reading the copy."""
    shutil.copytree(code_versions.PACKAGE_DIR, tmp_path / "nbutils", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(code_versions.NOTEBOOKS, tmp_path / "notebooks")
    monkeypatch.setattr(code_versions, "PACKAGE_DIR", tmp_path / "nbutils")
    monkeypatch.setattr(code_versions, "NOTEBOOKS", tmp_path / "notebooks")
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_digest_follows_the_code_a_kind_runs(package_copy):
    before = code_versions.current_digests()
    # a docstring or a comment changes nothing
    edit(package_copy / "nbutils" / "training" / "train.py", '"""', '"""An edited docstring. ')
    edit(package_copy / "nbutils" / "training" / "train.py", "\nimport", "\n# a comment\nimport")
    assert code_versions.current_digests() == before
    # the retraining loop reaches the retrain stages (and the attacks that train with it), not the search's metrics
    edit(package_copy / "nbutils" / "training" / "train.py", "    device: torch.device,\n) -> dict:", "    device: torch.device, unused: int = 0,\n) -> dict:")
    after = code_versions.current_digests()
    changed = {kind for kind in before if before[kind]["digest"] != after[kind]["digest"]}
    assert "retrain" in changed and "sensitivity" not in changed and "surrogate" not in changed


def test_digest_sees_the_notebook_and_the_c_sources(package_copy):
    before = code_versions.current_digests()
    edit(package_copy / "notebooks" / "04_retrain.ipynb", "run_trials(steps.retrain", "run_trials(steps.retrain ")   # a code cell
    assert code_versions.code_digest("retrain") != before["retrain"]["digest"]
    edit(package_copy / "nbutils" / "accel" / "channels_last_kernels.c", "\n", "\n/* edited */\n")
    assert code_versions.code_digest("search") != before["search"]["digest"]
    # (the metric-sensitivity stages reach the module too, through ntk_replicas' depthwise convolution)
    assert code_versions.code_digest("surrogate") == before["surrogate"]["digest"]


def test_a_bump_renews_the_keys_of_its_kind_and_of_their_readers(monkeypatch):
    preset = load_preset(ROOT / "tests" / "presets" / "tiny")
    before_by_label = {(s.kind, s.label): s.key for s in expand(preset)}
    monkeypatch.setitem(code_versions.CODE_VERSIONS, "retrain", code_versions.CODE_VERSIONS["retrain"] + 1)
    renewed = {s.kind for s in expand(preset) if before_by_label[(s.kind, s.label)] != s.key}
    assert renewed == {"retrain", "gallery", "report"}


def test_rerun_marks_a_kind_and_what_reads_it():
    stages = expand(load_preset(ROOT / "tests" / "presets" / "tiny"))
    mark_reruns(stages, {"retrain"})
    assert {s.kind for s in stages if s.rerun} == {"retrain", "gallery", "report"}
    assert all(s.rerun for s in stages if s.kind == "retrain")
    mark_reruns(stages, {"poison"})
    marked = [s for s in stages if s.rerun]
    assert {s.kind for s in marked} == {"poison", "search", "retrain", "gallery", "report"}
    assert not any(s.rerun for s in stages if s.kind == "search" and s.meta.get("attack") == "none")
