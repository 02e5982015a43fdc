"""Every bad input the parameter files once accepted until a stage failed (or, worse, until the
report counted a trial twice) is refused at validation, before any compute, with a message
naming the key, the value and what is allowed: one table, one row per input."""
import shutil

import pytest

from nbutils.pipeline import params, runner

# file, values, words the message must hold (the key, the value, the rule)
BAD_INPUTS = [
    ("grid", {"nas_algorithms": ["darts", "darts", "darts_anti"]},
     ["nas_algorithms", "'darts'", "positions 0 and 1"]),
    ("grid", {"nas_algorithms": ["darts", "darts_anti"],
              "attacks": [{"name": "none"}, {"name": "rlf", "budgets": [0.5], "algorithms": ["darts", "darts"]}]},
     ["attacks.1.algorithms", "positions 0 and 1"]),
    ("grid", {"attacks": [{"name": "none"}, {"name": "rlf", "budgets": [0.5, 0.1, 0.5]}]},
     ["attacks.1.budgets", "0.5", "positions 0 and 2"]),
    ("grid", {"attacks": [{"name": "none"}, {"name": "rlf", "budgets": [0.5]}, {"name": "rlf", "budgets": [0.5]}]},
     ["attacks", "positions 1 and 2"]),
    ("grid", {"ood": [{"dataset": "digits"}, {"dataset": "digits"}]}, ["ood", "'digits'", "positions 0 and 1"]),
    ("grid", {"ood": [{"dataset": "digits"}, {"dataset": "digits", "search_size": 100}]},
     ["ood", "darts on digits", "entries 0 and 1"]),
    ("grid", {"augmentation_ablation": ["darts", "darts"], "attacks": [{"name": "none"}, {"name": "gc", "budgets": [0.1]}]},
     ["augmentation_ablation", "positions 0 and 1"]),
    ("grid", {"attacks": [{"name": "none"}, {"name": "rlf", "budgets": [0.5]}],
              "defenses": [{"name": "sanitise", "attacks": ["rlf", "rlf"]}]},
     ["defenses.0.attacks", "'rlf'", "positions 0 and 1"]),
    ("grid", {"attacks": [{"name": "none"}, {"name": "rlf", "budgets": [0.5, 0.1]}],
              "defenses": [{"name": "sanitise", "attacks": ["rlf"]}, {"name": "sanitise", "attacks": ["rlf"], "budgets": [0.5]}]},
     ["defense 'sanitise'", "budget 0.5", "entries 0 and 1"]),
    ("grid", {"data": [{"dataset": "digits"}, {"dataset": "digits"}]}, ["data", "positions 0 and 1"]),
    ("metric_sensitivity", {"algorithms": ["robot", "robot"]}, ["algorithms", "positions 0 and 1"]),
    ("grid", {"data": {"search_size": 1}}, ["data.search_size = 1", "allowed: 2 or more"]),
    ("grid", {"ood": [{"dataset": "digits", "search_size": 1}]}, ["ood.0.search_size = 1", "allowed: 2 or more"]),
    ("grid", {"seed": 2**64}, ["seed = 18446744073709551616", "allowed: 0..2147483647"]),
    ("grid", {"seed": -1}, ["seed = -1", "allowed: 0..2147483647"]),
    ("grid", {"data": {"subset_seed": 2**40}}, ["data.subset_seed", "allowed: 0..2147483647"]),
    ("craft_poisons", {"seed": 2**32}, ["seed = 4294967296", "allowed: 0..2147483647"]),
    ("defend", {"seed": 2**64}, ["seed", "allowed: 0..2147483647"]),
    ("grid", {"trials": 10**7}, ["trials = 10000000", "allowed: 1..1000"]),
    ("grid", {"trials": 0}, ["trials = 0", "allowed: 1..1000"]),
    ("grid", {"random_samples": 10**6}, ["random_samples = 1000000", "allowed: 0..1000"]),
    ("defend", {"sanitise": {"sigma": 0.2}}, ["sanitise.sigma = 0.2", "a setting of denoise, not of sanitise",
                                              "fraction"]),
    ("defend", {"relabel": {"fraction": 0.3}}, ["relabel.fraction = 0.3", "a setting of sanitise"]),
    ("defend", {"denoise": {"kmeans_restarts": 3}}, ["denoise.kmeans_restarts = 3", "a setting of relabel"]),
    ("defend", {"sanitise": {"fractoin": 0.3}}, ["sanitise.fractoin", "not a setting of any defence"]),
]


@pytest.mark.parametrize("kind, values, words", BAD_INPUTS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_refused_naming_key_value_and_rule(kind, values, words):
    with pytest.raises(params.ParamsError) as refused:
        params.validate(kind, values, f"{kind}.yaml")
    message = str(refused.value)
    assert message.startswith(f"{kind}.yaml"), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("kind, values", [
    ("grid", {"data": {"search_size": 2}}),
    ("grid", {"seed": 2**31 - 1, "trials": 1000, "random_samples": 0}),
    ("grid", {"nas_algorithms": ["darts", "darts_anti"], "attacks": [
        {"name": "none"}, {"name": "rlf", "budgets": [0.5], "algorithms": ["darts"]},
        {"name": "rlf", "budgets": [0.1], "algorithms": ["darts_anti"]}]}),
    ("defend", {"sanitise": {"fraction": 0.3}, "relabel": {"kmeans_restarts": 3}, "denoise": {"sigma": 0.2}}),
])
def test_the_edges_of_the_rules_are_accepted(kind, values):
    params.validate(kind, values)


def test_a_repeated_algorithm_is_refused_before_any_compute(tmp_path):
    """The issue's probe: ``nas_algorithms: [darts, darts, darts_anti]`` stops the run at
    validation, and nothing is written to the outputs folder."""
    preset = tmp_path / "preset"
    shutil.copytree("tests/presets/tiny", preset)
    grid = (preset / "grid.yaml").read_text().replace("nas_algorithms: [darts]", "nas_algorithms: [darts, darts, darts_anti]")
    assert "darts_anti" in grid
    (preset / "grid.yaml").write_text(grid)
    outputs = tmp_path / "outputs"
    with pytest.raises(params.ParamsError, match=r"nas_algorithms .*'darts' is repeated at positions 0 and 1"):
        runner.run(preset, outputs)
    assert not outputs.exists()
