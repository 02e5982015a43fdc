"""The crafted attacks wired through the runner (steps run in-process): which stages the grid
expands to, which clean run each attack targets, and the poison sets that come out."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nbutils.pipeline import params, runner, steps
from nbutils.pipeline.stages import defend_stage, expand
from nbutils.attacks.poisoning import AttackConfig, poison
from nbutils.core.poison_set import PoisonSet
from nbutils.core.store import ArtifactStore, read_json
from nbutils.space.supernet import SuperNet

from toys import toy

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "tests" / "presets" / "tiny_attacks"


@pytest.fixture(scope="module")
def preset():
    return params.load_preset(PRESET)


@pytest.fixture(scope="module")
def stages(preset):
    return expand(preset)


def find(stages, kind, label_start):
    return [s for s in stages if s.kind == kind and s.label.startswith(label_start)]


def test_gradient_canceling_targets_each_algorithm_and_the_alpha_attack_darts(stages):
    (gc_darts,) = find(stages, "poison", "poison gc 25% against darts")
    (gc_pdarts,) = find(stages, "poison", "poison gc 25% against pdarts")
    (alpha,) = find(stages, "poison", "poison alpha-e2")
    (clf,) = find(stages, "poison", "poison clf")
    assert gc_darts.spec["target"] == {"algorithm": "darts", "kind": "alphas"}
    assert {s.meta["algorithm"] for s in gc_pdarts.inputs.values()} == {"pdarts"}
    assert sorted(gc_darts.inputs) == ["retrain0", "retrain1", "search0", "search1"]
    assert {s.meta["algorithm"] for s in alpha.inputs.values()} == {"darts"} and alpha.spec["ensemble"] == 2
    assert {s.meta["attack"] for s in alpha.inputs.values()} == {"none"}
    assert [s.kind for s in clf.inputs.values()] == ["surrogate"]
    # the CLF poison is one stage for both algorithms; GC one per algorithm
    searches = find(stages, "search", "search")
    assert {id(s.inputs["poison"]) for s in searches if s.meta["attack"] == "clf"} == {id(clf)}
    # every stage comes after the stages it reads
    position = {id(s): i for i, s in enumerate(stages)}
    assert all(position[id(inp)] < position[id(s)] for s in stages for inp in s.inputs.values())


def test_clean_searches_keep_the_supernets_the_attacks_need(stages, preset):
    for s in find(stages, "search", "search darts clean"):
        assert s.spec["keep_supernets"] == [0, 2]   # ensemble of 2 over 2 epochs: the first and the last
    for s in find(stages, "search", "search pdarts clean"):
        assert s.spec["keep_supernets"] == []       # the converged supernet only
    assert all("keep_supernets" not in s.spec for s in stages if s.kind == "search" and "clean" not in s.label)


def test_alpha_attack_without_darts_is_refused_before_compute(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(PRESET, bad)
    grid = (PRESET / "grid.yaml").read_text().replace("nas_algorithms: [darts, pdarts]", "nas_algorithms: [pdarts]")
    (bad / "grid.yaml").write_text(grid)
    with pytest.raises(params.ParamsError, match="alpha attack .* must include darts"):
        params.load_preset(bad)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Every poison and sensitivity stage of the tiny attacks preset, run in-process (the clean
    trials the crafted attacks target first): the tests that read it are marked slow."""
    outputs = tmp_path_factory.mktemp("attacks") / "outputs"
    poisons = runner.run(PRESET, outputs, only="poison", inline=True)
    studies = runner.run(PRESET, outputs, only="sensitivity", inline=True)   # reuses the poisons
    return outputs, poisons + [o for o in studies if o.stage.kind == "sensitivity"]


@pytest.mark.slow
def test_every_poison_stage_runs(crafted):
    _, outcomes = crafted
    assert {o.status for o in outcomes} == {"ran"}, [(o.stage.label, o.detail) for o in outcomes if o.status != "ran"]
    assert sum(o.stage.kind == "poison" for o in outcomes) == 4
    # one per attack, budget and measured algorithm (TE-NAS, RoBoT); gradient canceling none: this grid
    # crafts no GC poisons against TE-NAS or RoBoT
    assert sum(o.stage.kind == "sensitivity" for o in outcomes) == 4


@pytest.mark.slow
def test_metric_sensitivity_of_each_poison_set(crafted):
    """synflow sees an input of ones, never the data: exactly 0% change; label flipping
    cannot move jacob_cov or TE-NAS's kappa and R (no labels) but moves the loss-gradient metrics."""
    outputs, outcomes = crafted
    for o in outcomes:
        if o.stage.kind != "sensitivity":
            continue
        summary = {row["metric"]: row for row in read_json(outputs / "sensitivity" / o.stage.key / "result.json")["summary"]}
        if o.stage.meta["metrics_of"] == "tenas":
            assert set(summary) == {"ntk_condition_number", "linear_regions"}
            assert all(row["n"] == 2 for row in summary.values())
            if o.stage.meta["attack"] == "clf":
                assert summary["ntk_condition_number"]["mean"] == 0.0 and summary["linear_regions"]["mean"] == 0.0
            continue
        assert set(summary) == {"grad_norm", "snip", "grasp", "fisher", "synflow", "jacob_cov"}
        assert summary["synflow"]["mean"] == 0.0 and summary["synflow"]["n"] == 2
        if o.stage.meta["attack"] == "clf":
            assert summary["jacob_cov"]["mean"] == 0.0 and summary["grad_norm"]["mean"] != 0.0


def _poison_sets(crafted):
    outputs, outcomes = crafted
    pool = steps.search_pool(params.DataParams.model_validate(outcomes[0].stage.spec["data"]))
    for o in outcomes:
        if o.stage.kind == "poison":
            yield o.stage, PoisonSet.load(outputs / "poison" / o.stage.key, pool), pool


@pytest.mark.slow
def test_poisons_target_the_best_clean_run(crafted):
    outputs, _ = crafted
    for stage, poison_set, pool in _poison_sets(crafted):
        assert len(poison_set) == 12   # 25% of 48
        if stage.spec["attack"]["name"] == "clf":
            assert (poison_set.labels != pool.labels[poison_set.indices]).all()
            continue
        assert (poison_set.labels == pool.labels[poison_set.indices]).all()   # clean-label
        change = (poison_set.images.int() - pool.images[poison_set.indices].int()).abs()
        assert 0 < int(change.max()) <= 16
        chosen = poison_set.header["attacker_model"]
        accs = {role: read_json(outputs / "retrain" / s.key / "result.json")["test_acc"]
                for role, s in stage.inputs.items() if role.startswith("retrain")}
        assert chosen["test_acc"] == max(accs.values())
        if stage.spec["attack"]["name"] == "alpha":
            assert chosen["epochs"] == [0, 2] and poison_set.header["crafting"]["ensemble"] == 2
        else:
            assert chosen["kind"] == "alphas" and poison_set.header["crafting"]["target"] == "alphas"


@pytest.mark.slow
def test_gradient_canceling_on_retrained_weights(crafted, tmp_path):
    """The target of TE-NAS, RoBoT and NSGANetV2: the best clean run's retrained network."""
    _, outcomes = crafted
    (gc,) = [o.stage for o in outcomes if o.stage.label == "poison gc 25% against darts"]
    store = ArtifactStore(crafted[0])
    inputs = {role: str(store.path(s.kind, s.key)) for role, s in gc.inputs.items()}
    spec = {**gc.spec, "target": {"algorithm": "darts", "kind": "weights"}}
    models = steps.attacker_models(spec, inputs)
    assert not isinstance(models["target"], SuperNet)
    best = models["attacker_model"]["retrain"]
    trained = torch.load(Path(best) / "weights.pt", weights_only=True)
    assert all(torch.equal(v, trained[k]) for k, v in models["target"].state_dict().items())
    poison_set = steps.craft_poisons(spec, inputs, tmp_path)
    assert poison_set.header["crafting"]["target"] == "weights"
    reloaded = PoisonSet.load(tmp_path, steps.search_pool(params.DataParams.model_validate(spec["data"])))
    assert len(reloaded) == 12 and torch.equal(reloaded.images, poison_set.images)


def test_crafted_attack_without_its_model_is_refused():
    data = toy(8, seed=0, num_classes=2)
    for name, need in (("clf", "surrogate"), ("gc", "target"), ("alpha", "supernets")):
        with pytest.raises(ValueError, match=f"needs models\\['{need}'\\]"):
            poison(data, AttackConfig(name=name, budget=0.5), models={})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sanitise", "relabel"])
def test_defended_search_data_feeds_a_search(crafted, tmp_path, preset, name):
    outputs, outcomes = crafted
    (clf,) = [o.stage for o in outcomes if o.stage.label == "poison clf 25%"]
    stage = defend_stage(preset, preset.grid.data.model_dump(), name, clf)
    inputs = {"poison": str(outputs / "poison" / clf.key)}
    (tmp_path / "defend").mkdir()
    record = steps.defend(stage.spec, inputs, tmp_path / "defend")
    pool = steps.search_pool(preset.grid.data)
    defended = steps.load_defended(tmp_path / "defend", pool)
    assert len(defended) == record["samples_out"] and record["samples_in"] == 48
    if name == "sanitise":
        assert 30 <= len(defended) <= 38   # 30% of every class dropped, rounded per class
    else:
        assert len(defended) == 48 and torch.equal(defended.images, pool.images)
    (search,) = [s for s in expand(preset) if s.label == "search darts clf 25% trial 1"]
    (tmp_path / "search").mkdir()
    found = steps.search(search.spec, {"defended": str(tmp_path / "defend")}, tmp_path / "search")
    assert found["genotype"].summary()
    arrays = steps.load_search_arrays(tmp_path / "search")   # DARTS: alpha after each epoch
    assert set(arrays) == {"alpha_normal", "alpha_reduce"} and arrays["alpha_normal"].shape[1:] == (14, 8)
    (tmp_path / "search" / steps.SEARCH_ARRAYS_FILE).rename(tmp_path / "search" / "alphas.npz")   # an older search
    assert all(np.array_equal(steps.load_search_arrays(tmp_path / "search")[k], arrays[k]) for k in arrays)
