"""The runner end to end on the tiny preset: real notebooks executed by papermill, in this
process and on a local Dask cluster, a failing notebook that does not stop the others,
resumption, reuse, and errors before compute."""
import json
import re
import shutil
import socket
from pathlib import Path

import pytest

from nbutils.pipeline import code_versions, execution, runner
from nbutils.pipeline.stages import expand
from nbutils.__main__ import main
from nbutils.pipeline.params import load_preset
from nbutils.core.store import read_json

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "presets" / "tiny"
INJECTED = '''
_retrain = steps.retrain


def retrain_failing_for_seed_1(spec, inputs, out_dir):
    if spec.get("seed") == 1:
        raise RuntimeError("injected failure for the test")
    return _retrain(spec, inputs, out_dir)


steps.retrain = retrain_failing_for_seed_1
'''


def notebooks_failing_retrain_for_seed_1(tmp_path: Path) -> Path:
    """A copy of the notebooks whose retrain step fails for seed 1 (the second trial of each
    condition, which shares its execution with the first)."""
    import nbformat

    folder = tmp_path / "notebooks"
    shutil.copytree(execution.NOTEBOOKS, folder)
    nb = nbformat.read(folder / code_versions.NOTEBOOK_OF["retrain"], as_version=4)
    position = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(position + 2, nbformat.v4.new_code_cell(INJECTED))   # after the imports
    nbformat.write(nb, folder / code_versions.NOTEBOOK_OF["retrain"])
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A with a failing retrain notebook, run B with the real ones, run C again."""
    tmp = tmp_path_factory.mktemp("run")
    outputs = tmp / "outputs"
    stages = expand(load_preset(TINY))
    # an interrupted earlier run: a half-written stage folder that must not count
    leftover = outputs / "search" / f".tmp-{stages[1].key}-999999999-x"
    leftover.mkdir(parents=True)
    (leftover / "genotype.json").write_text("{half")

    mp = pytest.MonkeyPatch()
    mp.setattr(execution, "NOTEBOOKS", notebooks_failing_retrain_for_seed_1(tmp))
    a = runner.run(TINY, outputs, workers=1)   # in this process, where the patch applies
    mp.undo()
    kept = {o.stage.label: (o.notebook.exists() and o.notebook.parent.name.endswith(".failed"))
            for o in a if o.status == "failed"}
    b = runner.run(TINY, outputs, workers=2)   # on a local Dask cluster
    c = runner.run(TINY, outputs, workers=2)
    return {"outputs": outputs, "stages": stages, "a": a, "b": b, "c": c, "leftover": leftover, "kept": kept}


def by_status(outcomes):
    result = {}
    for o in outcomes:
        result.setdefault(o.status, []).append(o.stage.label)
    return result


def test_failing_notebook_does_not_stop_the_others(runs):
    status = by_status(runs["a"])
    assert sorted(status["failed"]) == sorted([
        "retrain <- search darts clean trial 2", "retrain <- search darts rlf 25% trial 2", "retrain <- random sample 2",
    ])
    assert len(status["ran"]) == 15 - 3 and "report" in status["ran"] and "genotype gallery" in status["ran"]
    for o in runs["a"]:
        if o.status == "failed":
            assert runs["kept"][o.stage.label]  # the executed notebook was kept in <key>.failed/
            assert "injected failure" in o.detail


def test_report_of_a_partial_run_lists_what_is_missing(runs):
    report = next(o for o in runs["a"] if o.stage.kind == "report")
    record = read_json(report.notebook.parent / "spec.json")
    assert {m["trial"] for m in record["spec"]["missing"]} == {1}
    assert len(record["spec"]["cells"]) == 3


def test_rerun_redoes_only_what_failed_and_resumes(runs):
    status = by_status(runs["b"])
    assert sorted(status["ran"]) == sorted([
        "retrain <- search darts clean trial 2", "retrain <- search darts rlf 25% trial 2",
        "retrain <- random sample 2", "genotype gallery", "report",
    ])
    assert len(status["reused"]) == 15 - 5 and "failed" not in status
    assert not runs["leftover"].exists()  # the interrupted run's leftovers were cleaned


def test_second_run_reuses_everything(runs):
    assert {o.status for o in runs["c"]} == {"reused"}


def test_artifacts_hold_real_results(runs):
    outputs = runs["outputs"]
    for stage in runs["stages"]:
        folder = outputs / stage.kind / stage.key
        record = read_json(folder / "spec.json")
        assert record["spec"] == stage.spec and (folder / "notebook.ipynb").exists()
        if stage.kind == "retrain":
            result = read_json(folder / "result.json")
            assert 0.0 <= result["test_acc"] <= 1.0 and len(result["curve"]) == 1
        if stage.kind == "poison":
            header = read_json(folder / "poison.json")
            assert header["count"] == 12  # 25% of 48 search images


def test_notebooks_are_committed_clean():
    for path in sorted(execution.NOTEBOOKS.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        assert all(not c.get("outputs") and not c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code"), path
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]), path


def test_report_html_is_self_contained_and_matches_the_artifacts(runs):
    html = (runs["outputs"] / "report.html").read_text()
    assert not re.search(r'(?:src|href)="https?://', html)
    assert "data:image/png;base64" in html  # the strip plot, inline
    # normal and reduction cells of each of the 6 architectures, plus best clean and worst poisoned
    assert html.count("<svg") == 2 * (6 + 2)
    assert "import nbutils" not in html and "steps.search(" not in html  # no code cells
    assert "tiny &lt;i&gt;run&lt;/i&gt; &amp;" in html and "<i>run</i>" not in html   # report.yaml's title is text
    assert "Where this ran" in html and f"<td>{socket.gethostname()}</td>" in html   # the environment, listed
    outputs = runs["outputs"]
    accs = [read_json(outputs / "retrain" / s.key / "result.json")["test_acc"] * 100
            for s in runs["stages"] if s.kind == "retrain" and s.meta["algorithm"] == "darts" and s.meta["attack"] == "rlf"]
    mean = sum(accs) / len(accs)
    assert f"{mean:.2f} ±" in html


def test_every_number_links_to_its_notebook(runs):
    outputs = runs["outputs"]
    html = (outputs / "report.html").read_text()
    assert "<base" not in html   # the copy beside the stage folders links relative to them
    for stage in runs["stages"]:
        if stage.kind in ("retrain", "search"):
            href = f"{stage.kind}/{stage.key}/notebook.ipynb"
            assert f'href="{href}"' in html and (outputs / href).is_file(), stage.label
    targets = set(re.findall(r'href="#([^"]+)"', html))
    anchors = set(re.findall(r' id="([^"]+)"', html))
    assert len(targets) >= 3 and targets <= anchors   # table cells -> their trials in the listing
    stage_copy = next(outputs.glob("report/*/report.html")).read_text()
    assert '<base href="../../">' in stage_copy


def test_bad_parameter_fails_before_compute(tmp_path, capsys):
    preset = tmp_path / "bad"
    shutil.copytree(TINY, preset)
    (preset / "grid.yaml").write_text((TINY / "grid.yaml").read_text().replace("budgets: [0.25]", "budgets: [25]"))
    assert main(["run", str(preset), "--outputs", str(tmp_path / "out")]) == 2
    assert "attacks.1.budgets.0 = 25" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_dataset_says_where_it_looked(tmp_path, capsys, monkeypatch):
    preset = tmp_path / "cifar"
    shutil.copytree(TINY, preset)
    grid = (TINY / "grid.yaml").read_text().replace("dataset: digits", f"dataset: cifar10\n  data_root: {tmp_path / 'empty'}")
    (preset / "grid.yaml").write_text(grid)
    assert main(["run", str(preset), "--outputs", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "download" in err
    assert not (tmp_path / "out").exists()


def test_killing_a_worker_loses_only_its_task(tmp_path):
    """SIGKILL the Dask worker running a search: Dask restarts the worker and runs that task
    again, every other artifact is kept, the run completes, and a re-run reuses everything."""
    import os
    import signal
    import threading

    outputs = tmp_path / "outputs"
    killed: dict = {}
    stop = threading.Event()

    def kill_the_first_search_worker():
        while not stop.is_set():
            for work in (outputs / "search").glob(".tmp-*"):   # .tmp-<key>-<pid of the worker>-<host>-...
                _, key, pid, _ = work.name.split("-", 3)
                if int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)
                    killed.update(key=key, pid=int(pid))
                    return
            stop.wait(0.02)

    killer = threading.Thread(target=kill_the_first_search_worker, daemon=True)
    killer.start()
    try:
        first = runner.run(TINY, outputs, workers=2, inline=True)
    finally:
        stop.set()
        killer.join()
    assert killed, "no search ran on a worker"
    assert {o.status for o in first} <= {"ran", "reused"}
    redone = next(o for o in first if o.stage.key == killed["key"])
    assert redone.status == "ran" and (outputs / "search" / killed["key"] / "genotype.json").is_file()
    stages = expand(load_preset(TINY))
    assert all((outputs / s.kind / s.key / "spec.json").is_file() for s in stages)
    second = runner.run(TINY, outputs, workers=2, inline=True)
    assert {o.status for o in second} == {"reused"}
    assert not list((outputs / "search").glob(f".tmp-*-{killed['pid']}-*"))   # the dead worker's leftovers
