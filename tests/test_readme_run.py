"""The program run the way the README runs it: ``python -m nbutils run <preset>`` as a
subprocess, through papermill and the local Dask cluster (no ``--inline``, no absolute
paths handed in), once from the project root with the default relative ``outputs`` folder
and once from another working directory with a relative ``--outputs``.

The project is copied into a temporary folder (the package, the notebooks and the tiny
preset as ``params/tiny``), so the run writes where a user's run would, next to the code,
and nothing lands in this checkout.
"""
import csv
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "presets" / "tiny"

pytestmark = pytest.mark.e2e


def project_copy(tmp: Path) -> Path:
    """A fresh project folder as a clone has it, with the tiny preset as ``params/tiny``."""
    project = tmp / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints", "outputs")
    shutil.copytree(ROOT / "nbutils", project / "nbutils", ignore=ignore)
    shutil.copytree(ROOT / "notebooks", project / "notebooks", ignore=ignore)
    shutil.copytree(TINY, project / "params" / "tiny")
    (project / "outputs").mkdir()
    shutil.copy(ROOT / "outputs" / "README.md", project / "outputs" / "README.md")
    return project


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m nbutils run ...`` in ``cwd``, with the package found as the user's shell finds it:
    from the project folder when run there, else from the installed package."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return subprocess.run([sys.executable, "-m", "nbutils", "run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def assert_complete_run(outputs: Path, result: subprocess.CompletedProcess) -> None:
    console = result.stdout + result.stderr
    assert result.returncode == 0, console
    assert " 0 failed, 0 skipped" in console, console
    assert "KeyboardInterrupt" not in console and "[IPKernelApp]" not in console, console
    report = outputs / "report.html"
    assert report.is_file(), console
    assert stat.S_IMODE(report.stat().st_mode) & 0o044 == 0o044, "report.html must be readable by group and others"
    page = report.read_text()
    assert "Figure size" not in page, "a figure was displayed as its text repr"
    assert page.count('src="data:image/png;base64,') >= 2   # accuracy against budget, every trial
    assert 'href="trials.csv"' in page and 'href="cells.csv"' in page
    for kind in ("search", "retrain", "poison", "report", "gallery"):
        done = [p for p in (outputs / kind).iterdir() if (p / "spec.json").is_file()]
        assert done, f"no {kind} stage completed in {outputs}"
    with open(outputs / "trials.csv", newline="") as f:
        trials = list(csv.DictReader(f))
    with open(outputs / "cells.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    # tiny: 2 clean + 2 RLF DARTS trials and 2 random samples, each retrained once
    assert len(trials) == 6
    assert {r["algorithm"] for r in trials} == {"darts", "random"}
    assert all(0 <= float(r["acc"]) <= 100 for r in trials)
    assert all((outputs / r["retrain_artifact"] / "spec.json").is_file() for r in trials)
    assert {(r["algorithm"], r["attack"]) for r in cells} == {("darts", "none"), ("darts", "rlf")}
    assert not (outputs.parent / "notebooks" / "outputs").exists()


def test_make_report_from_the_project_root_with_default_outputs(tmp_path):
    project = project_copy(tmp_path)
    first = run_cli(project, "params/tiny")
    assert_complete_run(project / "outputs", first)
    again = run_cli(project, "params/tiny")
    assert again.returncode == 0, again.stdout + again.stderr
    assert " 0 ran," in again.stdout, again.stdout


def test_relative_outputs_from_another_working_directory(tmp_path):
    project = project_copy(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli(elsewhere, str(project / "params" / "tiny"), "--outputs", "results/run1")
    assert_complete_run(elsewhere / "results" / "run1", result)
    assert list((project / "outputs").iterdir()) == [project / "outputs" / "README.md"]
    assert (elsewhere / "results" / "run1" / "README.md").is_file()   # what trials.csv and cells.csv hold
    for notebooks in (project / "notebooks", ROOT / "notebooks"):
        assert not (notebooks / "results").exists() and not (notebooks / "outputs").exists()
