"""Grid expansion on toy grids: which stages exist, what each reads, and their order."""
from pathlib import Path

import pytest

from nbutils.pipeline import execution, params
from nbutils.pipeline.progress import chain_lengths
from nbutils.pipeline.stages import expand

ROOT = Path(__file__).resolve().parent.parent
from nbutils.core.datasets import load_dataset

TINY_ATTACKS = Path(__file__).resolve().parent / "presets" / "tiny_attacks"


def preset(**grid):
    """A preset from the tiny test preset's files, with ``grid`` replacing grid.yaml's keys."""
    base = params.load_preset(TINY_ATTACKS)
    values = base.grid.model_dump()
    values.update(grid)
    return base.model_copy(update={"grid": params.validate("grid", values)})


def test_every_stage_follows_its_inputs_and_appears_once():
    stages = expand(preset(ood=[{"dataset": "noise", "search_size": 32, "search_image_size": 8}],
                                  augmentation_ablation=["pdarts"]))
    position = {id(s): i for i, s in enumerate(stages)}
    assert all(position[id(i)] < position[id(s)] for s in stages for i in s.inputs.values())
    assert len({(s.kind, s.key) for s in stages}) == len(stages)
    assert stages[-1].kind == "report"


def test_attack_restricted_to_some_algorithms():
    stages = expand(preset(attacks=[{"name": "none"}, {"name": "rlf", "budgets": [0.25], "algorithms": ["pdarts"]}]))
    searched = {(s.meta["algorithm"], s.meta["attack"]) for s in stages if s.kind == "search"}
    assert ("pdarts", "rlf") in searched and ("darts", "rlf") not in searched


def test_anti_search_runs_on_clean_data_only():
    stages = expand(preset(nas_algorithms=["darts", "darts_anti"], attacks=[
        {"name": "none"}, {"name": "rlf", "budgets": [0.25]}]))
    anti = [s for s in stages if s.kind == "search" and s.meta["algorithm"] == "darts_anti"]
    assert len(anti) == 2 and {s.meta["attack"] for s in anti} == {"none"}


def test_ood_search_on_other_data_retrains_on_the_grids():
    stages = expand(preset(ood=[{"dataset": "noise", "search_size": 32, "search_image_size": 8}]))
    ood = [s for s in stages if s.kind == "search" and s.meta.get("study") == "ood"]
    assert len(ood) == 2 * 2   # two algorithms x two trials
    assert all(s.spec["data"]["dataset"] == "noise" and s.spec["data"]["search_size"] == 32 for s in ood)
    retrains = [s for s in stages if s.kind == "retrain" and s.inputs["search"] in ood]
    assert len(retrains) == 4 and all(r.spec["data"]["dataset"] == "digits" for r in retrains)
    report = stages[-1]
    assert sum(c.get("study") == "ood" for c in report.spec["cells"]) == 4


def test_augmentation_ablation_reuses_the_gc_poisons():
    stages = expand(preset(augmentation_ablation=["pdarts"]))
    ablation = [s for s in stages if s.kind == "search" and s.meta.get("study") == "no_augment"]
    assert {s.meta["attack"] for s in ablation} == {"none", "gc"} and len(ablation) == 4
    assert all(s.spec["augment"] is False and s.spec["algorithm"] == "pdarts" for s in ablation)
    (gc,) = [s for s in stages if s.label == "poison gc 25% against pdarts"]
    assert all(s.inputs["poison"] is gc for s in ablation if s.meta["attack"] == "gc")


@pytest.mark.parametrize("grid, message", [
    ({"augmentation_ablation": ["pdarts"], "attacks": [{"name": "none"}]}, "must include gc"),
    ({"augmentation_ablation": ["robot"]}, "does not search"),
    ({"attacks": [{"name": "none"}, {"name": "rlf", "budgets": [0.5], "algorithms": ["robot"]}]}, "does not search"),
    ({"attacks": [{"name": "none"}, {"name": "rlf", "budgets": [0.5]}, {"name": "rlf", "budgets": [0.1, 0.5],
                                                                        "algorithms": ["pdarts"]}]},
     "rlf' at budget 0.5 on pdarts is in entries 1 and 2"),
    ({"attacks": [{"name": "none"}, {"name": "none"}]}, "none.*once"),
    ({"data": [{"dataset": "digits"}, {"dataset": "digits", "search_size": 100}]}, "each dataset may appear once"),
    ({"data": [{"dataset": "digits"}, {"dataset": "imagenet"}]}, r"data\.1\.dataset = 'imagenet'"),
    ({"data": []}, "at least 1"),
    ({"ood": [{"dataset": "imagenet"}]}, "ood.0.dataset"),
])
def test_impossible_grids_are_refused(grid, message):
    with pytest.raises(params.ParamsError, match=message):
        preset(**grid)


def test_noise_dataset_is_fixed_random_images():
    train, again = load_dataset("noise", "train"), load_dataset("noise", "train")
    test = load_dataset("noise", "test")
    assert train.images.shape == (2000, 1, 28, 28) and len(test) == 500 and train.num_classes == 10
    assert train.checksum() == again.checksum() != test.checksum()
    assert 120 < float(train.images.float().mean()) < 135   # uniform over 0..255


def test_defenses_read_the_poison_and_feed_the_search():
    stages = expand(preset(defenses=[{"name": "sanitise", "attacks": ["clf"], "algorithms": ["darts"]},
                                            {"name": "denoise", "attacks": ["gc"]}]))
    defends = [s for s in stages if s.kind == "defend"]
    assert sorted(s.label for s in defends) == [
        "defend with denoise against gc 25% against darts", "defend with denoise against gc 25% against pdarts",
        "defend with sanitise against clf 25%"]
    searches = [s for s in stages if s.kind == "search" and "defended" in s.inputs]
    assert len(searches) == (1 + 2) * 2 and all(s.inputs["defended"] in defends for s in searches)
    assert {s.meta["defense"] for s in searches} == {"sanitise", "denoise"}


def test_defense_of_an_attack_not_run_is_refused():
    with pytest.raises(params.ParamsError, match="names attacks \\['rlf'\\]"):
        preset(defenses=[{"name": "sanitise", "attacks": ["rlf"]}])


def test_label_flipping_skips_the_label_free_tenas():
    stages = expand(preset(nas_algorithms=["darts", "tenas"], attacks=[
        {"name": "none"}, {"name": "rlf", "budgets": [0.25]}, {"name": "gc", "budgets": [0.25]}]))
    tenas = {s.meta["attack"] for s in stages if s.kind == "search" and s.meta["algorithm"] == "tenas"}
    assert tenas == {"none", "gc"}
    with pytest.raises(params.ParamsError, match="never read"):
        preset(nas_algorithms=["darts", "tenas"],
               attacks=[{"name": "none"}, {"name": "clf", "budgets": [0.25], "algorithms": ["tenas"]}])


def test_defense_restricted_to_some_budgets():
    stages = expand(preset(attacks=[{"name": "none"}, {"name": "clf", "budgets": [0.25, 0.5]}],
                                  defenses=[{"name": "sanitise", "attacks": ["clf"], "budgets": [0.5]}]))
    assert {s.meta["budget"] for s in stages if s.kind == "defend"} == {0.5}
    with pytest.raises(params.ParamsError, match="names budgets \\[0.1\\]"):
        preset(defenses=[{"name": "sanitise", "attacks": ["clf"], "budgets": [0.1]}])


def test_trials_of_one_condition_share_an_execution():
    stages = expand(preset(attacks=[{"name": "none"}, {"name": "rlf", "budgets": [0.25]}]))
    groups = execution.executions(stages)
    assert sorted(s.key for g in groups for s in g) == sorted(s.key for s in stages)   # each stage once
    done = set()
    for group in groups:   # every execution after the executions it reads
        assert all(id(i) in done for s in group for i in s.inputs.values())
        done.update(id(s) for s in group)
        assert len({s.kind for s in group}) == 1
        if group[0].kind in execution.BATCHED:
            assert len({(s.meta["algorithm"], s.meta["attack"], s.meta.get("study")) for s in group}) == 1
            assert sorted(s.meta["trial"] for s in group) == list(range(len(group)))
        else:
            assert len(group) == 1
    trials = preset().grid.trials
    searches = [g for g in groups if g[0].kind == "search"]
    assert trials > 1 and all(len(g) == trials for g in searches)


def test_unbatched_executions_run_each_trial_alone():
    """With warm kernels every trial is an execution of its own, each after the one it reads."""
    stages = expand(preset(attacks=[{"name": "none"}, {"name": "rlf", "budgets": [0.25]}]))
    groups = execution.executions(stages, batched=False)
    assert all(len(g) == 1 for g in groups) and len(groups) == len(stages)
    placed = set()
    for (stage,) in groups:
        assert all(id(i) in placed for i in stage.inputs.values())
        placed.add(id(stage))


def test_longest_chains_first():
    groups = execution.executions(expand(preset(attacks=[{"name": "none"}, {"name": "gc", "budgets": [0.25]}])))
    length = dict(zip((g[0].label for g in groups), chain_lengths(groups)))
    # clean search -> clean retrain -> GC poison -> poisoned search -> retrain -> report
    assert length["search darts clean trial 1"] == 6 and length["report"] == 1
    assert length["poison gc 25% against darts"] == 4
    assert length["genotype gallery"] == 1


@pytest.mark.parametrize("preset", ["params/quick", "params/short", "params/tour", "params/cpu", "params/paper",
                                    "tests/presets/tiny_attacks"])
def test_every_stage_reads_data_its_step_accepts(preset):
    """The steps validate a stage's ``data`` again (in the notebook): every stage of a shipped
    preset, the out-of-distribution searches among them, must pass."""
    for stage in expand(params.load_preset(ROOT / preset)):
        if "data" in stage.spec:
            params.DataParams.model_validate(stage.spec["data"])


def test_an_attack_may_have_budgets_per_algorithm():
    """The workshop's RLF 5% on DARTS beside TMLR's 25% on every algorithm: one poison set per
    budget, shared by the algorithms that run it."""
    stages = expand(preset(attacks=[{"name": "none"}, {"name": "rlf", "budgets": [0.25]},
                                    {"name": "rlf", "budgets": [0.05], "algorithms": ["darts"]}]))
    cells = {(s.meta["algorithm"], s.meta["budget"]) for s in stages if s.kind == "search" and s.meta["attack"] == "rlf"}
    assert cells == {("darts", 0.25), ("pdarts", 0.25), ("darts", 0.05)}
    assert sorted(s.meta["budget"] for s in stages if s.kind == "poison" and s.meta["attack"] == "rlf") == [0.05, 0.25]


NOISE = {"dataset": "noise", "search_size": 32, "search_image_size": 8, "train_size": 32, "test_size": 16,
         "image_size": 8}


def test_several_datasets_each_run_the_main_study():
    one = preset()
    digits = one.grid.data.model_dump()
    stages = expand(preset(data=[digits, NOISE], ood=[{"dataset": "noise", "search_size": 32, "search_image_size": 8}],
                           augmentation_ablation=["pdarts"], random_samples=2))
    searches = [s for s in stages if s.kind == "search" and s.meta["algorithm"] != "random"]
    main = [s for s in searches if s.meta["study"] == "main"]
    by_dataset = {d: {(s.meta["algorithm"], s.meta["attack"], s.meta["budget"], s.meta["trial"])
                      for s in main if s.meta["dataset"] == d} for d in ("digits", "noise")}
    assert by_dataset["digits"] == by_dataset["noise"] and by_dataset["noise"]
    assert all(s.spec["data"]["dataset"] == s.meta["dataset"] for s in main)
    # the poisons of each dataset are its own; gradient canceling targets that dataset's clean runs
    for poison in (s for s in stages if s.kind == "poison"):
        assert poison.spec["data"]["dataset"] == poison.meta["dataset"]
        assert all(i.meta.get("dataset") == poison.meta["dataset"] for i in poison.inputs.values())
    # the other studies on the primary dataset only
    assert {s.meta["dataset"] for s in searches if s.meta["study"] != "main"} == {"digits"}
    assert {s.spec["data"]["dataset"] for s in stages if s.kind in ("defend", "sensitivity")} <= {"digits"}
    # one search per random sample, retrained on each dataset
    random = [s for s in stages if s.kind == "search" and s.meta["algorithm"] == "random"]
    retrained = [s for s in stages if s.kind == "retrain" and s.inputs["search"] in random]
    assert len(random) == 2 and len(retrained) == 4
    assert {r.meta["dataset"] for r in retrained} == {"digits", "noise"}
    labels = [s.label for s in stages]
    assert len(labels) == len(set(labels))


def test_one_dataset_in_a_list_is_the_same_run():
    single = expand(preset())
    listed = expand(preset(data=[preset().grid.data.model_dump()]))
    keys = lambda stages: [(s.kind, s.key) for s in stages if s.kind not in ("report", "gallery")]
    assert keys(single) == keys(listed)


def test_ood_searches_take_their_datasets_augmentation():
    """The authors' fork searches MNIST and SVHN without augmentation, the others with it."""
    stages = expand(preset(ood=[{"dataset": "mnist", "search_size": 32}, {"dataset": "noise", "search_size": 32}]))
    augment = {s.meta["search_dataset"]: s.spec["augment"] for s in stages
               if s.kind == "search" and s.meta.get("study") == "ood"}
    assert augment == {"mnist": False, "noise": True}


def test_main_searches_take_their_datasets_augmentation():
    """A grid on MNIST searches without augmentation, as the reference; digits with it."""
    mnist = {"dataset": "mnist", "search_size": 48, "train_size": 96, "test_size": 64}
    stages = expand(preset(data=[preset().grid.data.model_dump(), mnist]))
    augment = {(s.spec["data"]["dataset"], s.spec["augment"]) for s in stages
               if s.kind == "search" and s.spec["algorithm"] != "random"}
    assert augment == {("digits", True), ("mnist", False)}


def test_table_2_cells_without_a_study_are_listed_once():
    """Gradient canceling in two entries at one budget (per-algorithm budgets): each missing
    Table 2 cell once, its reason naming every attacked algorithm."""
    stages = expand(preset(nas_algorithms=["darts", "pdarts", "robot"],
                           attacks=[{"name": "none"}, {"name": "gc", "budgets": [0.25], "algorithms": ["darts"]},
                                    {"name": "gc", "budgets": [0.25], "algorithms": ["pdarts"]}]))
    not_run = {r["metrics_of"]: r["reason"] for r in stages[-1].spec["sensitivity_not_run"]}
    assert len(stages[-1].spec["sensitivity_not_run"]) == len(not_run) == 2
    assert "attack gc's algorithms at 25% are ['darts', 'pdarts']" in not_run["robot"]
    assert "nas_algorithms does not search it" in not_run["tenas"]


def test_retrain_spec_carries_a_new_setting_only_when_changed():
    """A retraining setting added with ``keyed_when_changed`` (``lr_schedule``) leaves the retrain
    stages of a preset that does not set it with the spec, and so the key, they had before."""
    base = params.load_preset(TINY_ATTACKS)
    default = [s for s in expand(base) if s.kind == "retrain"]
    assert default and all("lr_schedule" not in s.spec["config"] for s in default)
    per_step = base.model_copy(update={"retrain": params.validate(
        "retrain", {**base.retrain.model_dump(), "lr_schedule": "step"})})
    changed = [s for s in expand(per_step) if s.kind == "retrain"]
    assert all(s.spec["config"]["lr_schedule"] == "step" for s in changed)
    assert {s.key for s in changed}.isdisjoint(s.key for s in default)


def test_a_change_of_the_retraining_data_re_runs_the_retrainings_only():
    """train_size, test_size and image_size are read by retraining alone: changing them keeps the
    key of every stage that reads no retraining (searches, poisons, the surrogate, the metric
    studies), and changes every retraining's. (Gradient canceling crafts against the clean run of
    best retrained accuracy, so its poisons and their searches follow the retrainings.)"""
    base = params.load_preset(TINY_ATTACKS)
    data = base.grid.model_dump()["data"]
    changed = preset(data={**data, "train_size": (data["train_size"] or 40) + 1, "test_size": 7, "image_size": 12})
    before, after = expand(base), expand(changed)

    def reads_a_retraining(stage) -> bool:
        return any(i.kind == "retrain" or reads_a_retraining(i) for i in stage.inputs.values())

    def upstream(stages):
        return [(s.kind, s.key) for s in stages if s.kind not in ("retrain", "gallery", "report")
                and not reads_a_retraining(s)]

    assert {kind for kind, _ in upstream(before)} >= {"search", "poison", "surrogate"}
    assert upstream(before) == upstream(after)
    retrains_before = {s.key for s in before if s.kind == "retrain"}
    assert retrains_before and retrains_before.isdisjoint(s.key for s in after if s.kind == "retrain")
