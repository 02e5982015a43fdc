"""The run's cost and progress: the cost model's units and estimates, the schedule behind the
wall time, the ``--dry-run`` table, and the per-stage lines with the time left."""
import io
import json
import re
from pathlib import Path

import pytest

from nbutils.core.store import ArtifactStore
from nbutils.pipeline import runner
from nbutils.nas.search_cost import ARCH_STEP_SHARE, STEP_OVERHEAD_PER_CELL
from nbutils.pipeline.cost_model import (CostModel, cost_class, format_duration,
                                         work_units)
from nbutils.pipeline.execution import Outcome
from nbutils.pipeline.params import load_preset
from nbutils.pipeline.progress import Plan, Progress, makespan
from nbutils.pipeline.stages import expand

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "presets" / "tiny"
LINE = re.compile(r"^\[(\d+)/(\d+)\] (.+): (ran in \d+\.\d s|reused|failed|skipped)(.*)$")


def tiny_stages():
    return expand(load_preset(TINY))


def flat_model(**rates):
    """Every class at 1 s per unit unless given."""
    names = {cost_class(s.kind, s.spec) for s in tiny_stages()}
    return CostModel({name: rates.get(name, 1.0) for name in names})


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (44.2, "45 s"), (250, "4 min 10 s"), (1380, "23 min"),
                                           (7500, "2 h 05 min")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_work_units_scale_with_images_epochs_and_network():
    search = next(s for s in tiny_stages() if s.kind == "search" and s.spec["algorithm"] == "darts")
    spec = json.loads(json.dumps(search.spec))
    base = work_units("search", spec)
    spec["config"]["epochs"] *= 3
    assert work_units("search", spec) == pytest.approx(3 * base)
    spec["data"]["search_size"] = spec["config"]["batch_size"] * 2 * 5   # 5 batches per half
    spec["data"]["search_image_size"] = 8
    config = spec["config"]
    step = STEP_OVERHEAD_PER_CELL * config["layers"] + config["batch_size"] * (
        config["channels"] ** 2 * config["layers"] * spec["data"]["search_image_size"] ** 2 / 1e6)
    assert work_units("search", spec) == pytest.approx(config["epochs"] * 5 * (1 + ARCH_STEP_SHARE[1]) * step)
    spec["config"]["warmup_epochs"] = 1   # one epoch without architecture steps
    assert work_units("search", spec) == pytest.approx(5 * ((config["epochs"] + ARCH_STEP_SHARE[1] * (config["epochs"] - 1))
                                                            * step))
    retrain = next(s for s in tiny_stages() if s.kind == "retrain")
    spec = json.loads(json.dumps(retrain.spec))
    spec["data"]["test_size"] = 0
    base = work_units("retrain", spec)
    spec["config"]["epochs"] *= 2
    assert work_units("retrain", spec) == pytest.approx(2 * base)
    assert cost_class("search", {"algorithm": "darts_anti"}) == "search darts"
    assert cost_class("poison", {"attack": {"name": "gc"}}) == "poison gc"


def test_measured_class_replaces_the_model_and_rescales_the_others():
    stages = tiny_stages()
    search = next(s for s in stages if s.kind == "search" and s.spec["algorithm"] == "darts")
    retrain = next(s for s in stages if s.kind == "retrain")
    model = flat_model()
    units = work_units("search", search.spec)
    assert model.estimate("search", search.spec).basis == "modelled"
    assert model.estimate("search", search.spec).seconds == pytest.approx(units)
    model.observe("search", search.spec, seconds=3 * units)   # this machine: 3x slower than the table
    measured = model.estimate("search", search.spec)
    assert measured.basis == "measured" and measured.seconds == pytest.approx(3 * units)
    other = model.estimate("retrain", retrain.spec)   # never measured: modelled, at the measured speed
    assert other.basis == "modelled"
    assert other.seconds == pytest.approx(3 * work_units("retrain", retrain.spec))


def test_makespan_known_answers():
    none = [set(), set(), set()]
    assert makespan([10, 10], none[:2], workers=2, priority=[1, 1]) == 10
    assert makespan([10, 10], none[:2], workers=1, priority=[1, 1]) == 20
    # a chain 0 -> 1 (5 + 5 s) beside 2 (8 s): the chain first, then 2 beside it
    assert makespan([5, 5, 8], [set(), {0}, set()], workers=2, priority=[2, 1, 1]) == 10
    # one worker, longest chain first: 5 + 8 + 5
    assert makespan([5, 5, 8], [set(), {0}, set()], workers=1, priority=[2, 1, 1]) == 18
    # 0 done, 2 under way with 3 s left: 1 (5 s) beside it
    assert makespan([5, 5, 8], [set(), {0}, set()], workers=2, priority=[2, 1, 1], done={0}, running={2: 3}) == 5


def write_records(outputs: Path, stages, seconds: float) -> None:
    store = ArtifactStore(outputs)
    for s in stages:
        folder = store.path(s.kind, s.key)
        folder.mkdir(parents=True)
        (folder / "spec.json").write_text(json.dumps({"kind": s.kind, "spec": s.spec, "seconds": seconds,
                                                      "inputs": {r: {"kind": i.kind, "key": i.key} for r, i in s.inputs.items()}}))


def test_dry_run_prints_counts_cpu_hours_and_their_basis(tmp_path):
    stages = tiny_stages()
    out = io.StringIO()
    assert runner.run(TINY, tmp_path / "empty", dry_run=True, workers=2, out=out) == []
    text = out.getvalue()
    table = {m.group(1): m.groups() for m in re.finditer(r"^(\w+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(.*)$", text, re.M)}
    for kind in {s.kind for s in stages}:
        count = sum(s.kind == kind for s in stages)
        assert table[kind][1:3] == (str(count), str(count)) and table[kind][5] == f"{count} modelled"
    assert "Wall time on 2 workers" in text
    # every stage recorded at 36 s: the whole run is 15 x 36 s = 0.15 CPU h, none to run
    write_records(tmp_path / "full", stages, seconds=36.0)
    out = io.StringIO()
    runner.run(TINY, tmp_path / "full", dry_run=True, workers=2, out=out)
    total = re.search(r"^total\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)", out.getvalue(), re.M).groups()
    assert total == (str(len(stages)), "0", f"{len(stages) * 36 / 3600:.3f}", "0.000")
    assert "recorded" in out.getvalue() and "modelled" not in out.getvalue().split("Wall time")[0]


def test_measured_classes_estimate_the_stages_to_run(tmp_path):
    """Stages of a class already in the store (other keys) give that class its seconds per unit."""
    stages = tiny_stages()
    retrains = [s for s in stages if s.kind == "retrain"]
    done = retrains[:2]
    write_records(tmp_path, done, seconds=10.0)
    plan = Plan(stages, ArtifactStore(tmp_path), CostModel.from_store(tmp_path, flat_model().modelled), workers=2)
    rate = 20.0 / sum(work_units("retrain", s.spec, 1) for s in done)
    for s in retrains[2:]:
        estimate = plan.estimate(s)
        assert estimate.basis == "measured"
        assert estimate.seconds == pytest.approx(rate * work_units("retrain", s.spec, 1))
    assert plan.estimate(done[0]).basis == "recorded" and plan.estimate(done[0]).seconds == 10.0


def test_progress_lines_count_up_and_give_the_time_left_from_the_model(tmp_path):
    stages = tiny_stages()
    plan = Plan(stages, ArtifactStore(tmp_path), flat_model(), workers=2)
    now = [0.0]
    out = io.StringIO()
    progress = Progress(plan, out, clock=lambda: now[0])
    assert re.match(rf"^{len(stages)} stages, {len(stages)} to run: about .+ on 2 workers \(estimated from "
                    rf"{len(stages)} modelled\)$", progress.header())
    seen = []
    for group in plan.groups:
        estimate = sum(plan.estimate(s).seconds for s in group)   # the model, as it stands before this group
        now[0] += estimate
        for stage in group:
            progress.finished(stage, Outcome(stage, "ran", estimate / len(group)))
        if progress.done < len(stages):   # the time left: the schedule of what is not done
            durations = plan.durations()
            left = makespan(durations, plan.needs, 2, plan.priority, progress._finished_groups,
                            {i: max(0.0, durations[i] - (now[0] - since)) for since, i in
                             sorted((t, i) for i, t in progress._ready_since.items()
                                    if i not in progress._finished_groups)[:2]})
            assert out.getvalue().splitlines()[-1].endswith(f"[about {format_duration(left)} left]")
    lines = out.getvalue().splitlines()
    assert len(lines) == len(stages)
    for line in lines:
        match = LINE.match(line)
        assert match, line
        seen.append(int(match.group(1)))
        assert int(match.group(2)) == len(stages)
    assert seen == list(range(1, len(stages) + 1))   # done counts up by one per stage
    assert "left]" not in lines[-1] and "left]" in lines[-2]


def test_time_left_follows_the_measured_speed(tmp_path):
    """Stages that run twice as long as modelled double the estimate of what is left."""
    stages = tiny_stages()
    plan = Plan(stages, ArtifactStore(tmp_path), flat_model(), workers=1)
    progress = Progress(plan, io.StringIO(), clock=lambda: 0.0)
    before = progress.time_left()
    first = plan.groups[0]
    modelled = sum(plan.estimate(s).seconds for s in first)
    for stage in first:
        progress.finished(stage, Outcome(stage, "ran", 2 * modelled / len(first)))
    rest = sum(plan.durations()[1:])
    assert progress.time_left() == pytest.approx(rest)
    assert rest == pytest.approx(2 * (before - modelled))   # every class at the measured speed


def test_run_prints_a_plan_and_one_line_per_stage(tmp_path, monkeypatch):
    """The runner's console: the estimate, then per stage [done/total] with the time left."""
    stages = tiny_stages()
    monkeypatch.setattr(runner, "preflight", lambda preset: None)
    monkeypatch.setattr(runner, "print_summary", lambda *a, **k: None)
    monkeypatch.setattr(runner, "publish_report", lambda *a, **k: None)
    monkeypatch.setattr(runner, "run_execution", lambda group, store, kernel, inputs, fresh_kernel=False, timeout=None:
                        [Outcome(s, "ran", 1.5) for s in group])
    out = io.StringIO()
    runner.run(TINY, tmp_path, workers=1, inline=True, out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"{len(stages)} stages, {len(stages)} to run: about")
    done = [int(m.group(1)) for m in map(LINE.match, lines) if m]
    assert done == list(range(1, len(stages) + 1))
    assert all(line.endswith("left]") for line in lines if LINE.match(line) and not line.startswith(f"[{len(stages)}/"))
