"""One outputs folder shared safely: two runs at once, damaged artifacts, execution timeouts
(the tiny preset, end to end)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from nbutils.core.store import ArtifactStore
from nbutils.pipeline import params, runner
from nbutils.pipeline.execution import run_execution
from nbutils.pipeline.params import load_preset
from nbutils.pipeline.stages import expand

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "presets" / "tiny"


@pytest.mark.e2e
def test_two_runs_at_once_on_one_folder_both_finish_and_a_third_reuses(tmp_path):
    """The issue's target: two ``python -m nbutils run tests/presets/tiny`` started together on
    one folder both exit cleanly, without a traceback, sharing the work; a third reuses it all."""
    command = [sys.executable, "-m", "nbutils", "run", str(TINY), "--outputs", str(tmp_path / "outputs")]
    runs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    logs = [run.communicate(timeout=600)[0] for run in runs]
    for run, log in zip(runs, logs):
        assert run.returncode == 0, log
        assert "Traceback" not in log and "FAILED" not in log, log
    ran = [int(log.split("Summary")[1].split(" ran,")[0].split(": ")[-1]) for log in logs]
    assert sum(ran) >= 15 and min(ran) < 15, logs   # every stage computed, and not all of them twice
    third = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "0 ran, 15 reused" in third.stdout, third.stdout + third.stderr
    assert not list((tmp_path / "outputs").glob("*/.tmp-*")) and not list((tmp_path / "outputs").glob("*/.*.lock"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("shared") / "outputs"
    runner.run(TINY, outputs, workers=1, inline=True, only="retrain")
    return outputs


@pytest.mark.slow
def test_a_truncated_result_is_recomputed_never_reused(tiny_run):
    stages = expand(load_preset(TINY))
    retrain = next(s for s in stages if s.kind == "retrain")
    result = tiny_run / "retrain" / retrain.key / "result.json"
    good = json.loads(result.read_text())
    result.write_text(result.read_text()[:40])
    outcomes = runner.run(TINY, tiny_run, workers=1, inline=True, only="retrain")
    redone = next(o for o in outcomes if o.stage.key == retrain.key)
    assert redone.status == "ran" and redone.detail == (
        f"recomputed: retrain/{retrain.key}/result.json does not match its recorded SHA-256 (truncated or edited)")
    again = json.loads(result.read_text())
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in good.items() if k != "seconds"}
    assert {o.status for o in outcomes if o.stage.key != retrain.key} == {"reused"}


@pytest.mark.slow
def test_a_damaged_input_fails_the_stage_that_reads_it_naming_the_file(tiny_run):
    stages = expand(load_preset(TINY))
    retrain = next(s for s in stages if s.kind == "retrain" and s.inputs["search"].spec.get("algorithm") == "darts")
    search = retrain.inputs["search"]
    genotype = tiny_run / "search" / search.key / "genotype.json"
    genotype.write_text(genotype.read_text().replace("sep_conv_3x3", "max_pool_3x3", 1)
                        .replace("dil_conv_3x3", "max_pool_3x3", 1).replace("skip_connect", "max_pool_3x3", 1))
    retrain.rerun = True
    [outcome] = run_execution([retrain], ArtifactStore(tiny_run), kernel=None)
    assert outcome.status == "failed"
    assert outcome.detail == (f"an input is damaged: search/{search.key}/genotype.json does not match its recorded "
                              "SHA-256 (truncated or edited)")


@pytest.mark.parametrize("values, limits", [
    (["600"], {None: 600}),
    (["search=7200", "0"], {"search": 7200, None: None}),
    (["report=0"], {"report": None}),
    (["retrain=90.2"], {"retrain": 91}),   # whole seconds: papermill takes no fraction
])
def test_timeouts_are_parsed(values, limits):
    parsed = runner.parse_timeouts(values)
    assert parsed == limits and all(v is None or type(v) is int for v in parsed.values())


@pytest.mark.parametrize("value, words", [("searc=10", "'searc' is not a kind of stage"), ("-1", "a number >= 0"),
                                          ("ten", "a number >= 0"), ("search=inf", "a number >= 0")])
def test_a_bad_timeout_is_refused_before_compute(value, words, tmp_path):
    with pytest.raises(params.ParamsError, match=words):
        runner.run(TINY, tmp_path / "out", timeouts=[value])
    assert not (tmp_path / "out").exists()


def test_the_default_timeout_is_a_generous_multiple_of_the_estimate(tmp_path):
    from nbutils.pipeline.cost_model import CostModel
    from nbutils.pipeline.progress import Plan

    stages = expand(load_preset(ROOT / "params" / "quick"))
    plan = Plan(stages, ArtifactStore(tmp_path), CostModel(), workers=1)
    search = next(g for g in plan.groups if g[0].kind == "search")
    estimate = sum(plan.estimate(s).seconds for s in search)
    timeout = runner.execution_timeout(search, plan, {})
    assert type(timeout) is int and timeout == math.ceil(max(runner.MIN_TIMEOUT, runner.TIMEOUT_MARGIN * estimate))
    assert timeout >= 10 * estimate > 0 and timeout != 10 * estimate   # the quick search's estimate is fractional
    assert runner.execution_timeout(search, plan, {"search": 60.0, None: 5.0}) == 60.0
    assert runner.execution_timeout(search, plan, {"retrain": 60.0, None: None}) is None


@pytest.mark.e2e
def test_a_timeout_with_a_fraction_reaches_papermill_as_whole_seconds(tiny_run):
    """The cost model's estimates are fractional; papermill's client takes whole seconds only
    (a fractional one failed every notebook of a quick run before any cell ran)."""
    from nbutils.pipeline.execution import kernel_name

    sample = next(s for s in expand(load_preset(TINY)) if s.kind == "search" and s.spec.get("algorithm") == "random")
    sample.rerun = True
    [outcome] = run_execution([sample], ArtifactStore(tiny_run), kernel=kernel_name(), timeout=1919.56)
    assert outcome.status == "ran", outcome.detail
