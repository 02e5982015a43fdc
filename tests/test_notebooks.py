"""Every notebook runs on its own, as "Run All" in JupyterLab runs it in a fresh clone: headless
under papermill with the project's kernel, cwd ``notebooks/``, default parameters, nothing
computed (an empty outputs folder and an empty scratch folder), and reads as a lesson.

The notebooks run in file order and share one scratch folder, as a student running them one
after the other would: the later ones reuse the stages the earlier ones computed there
(``nbutils.pipeline.examples``). Each run by hand computes at the lesson's size (params/lesson);
the time of each is printed (``pytest -s``) and recorded in benchmarks/README.md.
"""
import json
import re
import time
from pathlib import Path

import pytest

from nbutils.pipeline import code_versions, examples, execution

NOTEBOOKS = sorted(code_versions.NOTEBOOKS.glob("*.ipynb"))
MIN_MARKDOWN_CELLS = 4
MIN_WORDS = 250


def markdown_words(notebook: Path) -> tuple[int, int]:
    """Markdown cells and the words in them (LaTeX and code spans count as words too)."""
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "markdown"]
    return len(cells), sum(len("".join(c["source"]).split()) for c in cells)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_reads_as_a_lesson(notebook):
    cells, words = markdown_words(notebook)
    assert cells >= MIN_MARKDOWN_CELLS and words >= MIN_WORDS, f"{notebook.name}: {cells} markdown cells, {words} words"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_only_public_names(notebook):
    code = "\n".join("".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code")
    private = re.findall(r"\b\w+\._[a-z]\w*", code)
    assert not private, f"{notebook.name} reaches private names {private}: make them public in nbutils"


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """An empty outputs folder and an empty scratch folder, for the kernels the notebooks run in
    (they inherit this process's environment); the project's own outputs/ must stay as it is."""
    mp = pytest.MonkeyPatch()
    outputs, scratch = tmp_path_factory.mktemp("outputs"), tmp_path_factory.mktemp("scratch")
    mp.setenv(examples.OUTPUTS_ENV, str(outputs))
    mp.setenv(examples.SCRATCH_ENV, str(scratch))
    project_outputs = code_versions.PROJECT_ROOT / "outputs"
    before = sorted(p.relative_to(project_outputs) for p in project_outputs.rglob("*")) if project_outputs.exists() else []
    yield {"outputs": outputs, "scratch": scratch, "executed": tmp_path_factory.mktemp("executed")}
    mp.undo()
    after = sorted(p.relative_to(project_outputs) for p in project_outputs.rglob("*")) if project_outputs.exists() else []
    assert after == before, "a notebook run by hand wrote into the project's outputs/"
    assert not any(outputs.iterdir()), "a notebook run by hand wrote into the outputs folder it reads"


@pytest.mark.e2e
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_standalone(notebook, fresh_clone):
    import papermill

    start = time.perf_counter()
    executed = fresh_clone["executed"] / notebook.name
    papermill.execute_notebook(str(notebook), str(executed), kernel_name=execution.kernel_name(),
                               cwd=str(code_versions.NOTEBOOKS), progress_bar=False, log_output=False)
    seconds = time.perf_counter() - start
    print(f"{notebook.name}: {seconds:.1f} s")
    nb = json.loads(executed.read_text())
    errors = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    shown = sum(1 for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                if o["output_type"] in ("display_data", "execute_result"))
    assert shown >= 2, f"{notebook.name} showed {shown} results"


def test_a_stage_by_hand_is_chosen_from_the_lesson_preset(tmp_path):
    """Run by hand, a notebook's stage is one that reads inputs, with the fewest to compute; the
    lesson preset has every kind but the CLF surrogate and the defences, taken from the tour."""
    from nbutils.core.store import ArtifactStore

    stages = examples.preset_stages(examples.LESSON_PRESET)
    kinds = {s.kind for s in stages}
    assert kinds == set(code_versions.NOTEBOOK_OF) - {"surrogate", "defend"}
    assert {s.kind for s in examples.preset_stages(examples.FALLBACK_PRESET)} >= {"surrogate", "defend"}
    empty = (ArtifactStore(tmp_path),)
    search = examples.choose_stage(stages, "search", stores=empty)
    assert search.meta["attack"] == "rlf" and len(examples.upstream(search)) == 1   # its poison only
    poison = examples.choose_stage(stages, "poison", {"attack": "gc"}, stores=empty)
    assert poison.meta["attack"] == "gc" and {s.kind for s in examples.upstream(poison)} == {"search", "retrain"}
    retrain = examples.choose_stage(stages, "retrain", stores=empty)
    assert [s.kind for s in examples.upstream(retrain)] == ["search"] and not retrain.inputs["search"].inputs
    report = examples.choose_stage(stages, "report", stores=empty)
    order = examples.upstream(report)
    assert all(examples.upstream(s) == [] or set(map(id, examples.upstream(s))) <= set(map(id, order[:i]))
               for i, s in enumerate(order))   # each after the stages it reads


def test_scratch_and_outputs_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(examples.SCRATCH_ENV, str(tmp_path / "scratch"))
    monkeypatch.setenv(examples.OUTPUTS_ENV, str(tmp_path / "outputs"))
    assert examples.scratch_folder() == tmp_path / "scratch" and examples.scratch_folder().is_dir()
    assert examples.user_outputs() == tmp_path / "outputs"
    monkeypatch.delenv(examples.OUTPUTS_ENV)
    assert examples.user_outputs() == code_versions.PROJECT_ROOT / "outputs"
