"""Parameter files: validated into typed params, every problem named before any compute; the
search sections and retrain.yaml are the engines' configs, checked by the same rules in YAML and
in code."""
import dataclasses
from pathlib import Path

import pytest

from nbutils.core.config import ConfigError
from nbutils.core.datasets import SPLIT_SIZES, load_dataset
from nbutils.nas.darts import DartsConfig
from nbutils.nas.robot import RobotConfig
from nbutils.pipeline import params
from nbutils.pipeline.params import ParamsError, load_preset, validate
from nbutils.pipeline.stages import Stage, expand
from nbutils.training.train import RetrainConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset", ["params/quick", "params/tour", "tests/presets/tiny"])
def test_shipped_presets_validate(preset):
    p = load_preset(ROOT / preset)
    assert p.grid.trials >= 2
    assert any(a.name == "none" for a in p.grid.attacks)


def test_yaml_exponent_strings_are_numbers(tmp_path):
    # YAML 1.1 reads 3e-3 (no dot) as a string
    search = validate("search", params.read_yaml(_write(tmp_path, "darts:\n  arch_lr: 3e-3\n  weight_decay: 1e-4\n")))
    assert search.darts.arch_lr == pytest.approx(0.003) and isinstance(search.darts.arch_lr, float)
    assert search.darts.weight_decay == pytest.approx(1e-4)


def test_unknown_key_is_named():
    with pytest.raises(ParamsError, match=r"search.yaml: unknown key 'darts.epoch'"):
        validate("search", {"darts": {"epoch": 3}}, "search.yaml")


def test_wrong_type_names_key_value_and_rule():
    with pytest.raises(ParamsError) as e:
        validate("retrain", {"epochs": "many"}, "retrain.yaml")
    assert "retrain.yaml: epochs = 'many'" in str(e.value) and "integer" in str(e.value)


@pytest.mark.parametrize("budget", [0, -0.1, 1.5])
def test_budget_outside_unit_interval(budget):
    grid = {"attacks": [{"name": "none"}, {"name": "rlf", "budgets": [budget]}]}
    with pytest.raises(ParamsError) as e:
        validate("grid", grid, "grid.yaml")
    assert f"attacks.1.budgets.0 = {budget!r}" in str(e.value)


@pytest.mark.parametrize("eps", [-1, 256])
def test_eps_in_pixel_units(eps):
    with pytest.raises(ParamsError, match=r"eps = "):
        validate("craft_poisons", {"eps": eps})


def test_unknown_dataset_lists_the_registered_ones():
    with pytest.raises(ParamsError) as e:
        validate("grid", {"data": {"dataset": "imagenet"}})
    message = str(e.value)
    assert "data.dataset = 'imagenet'" in message
    for name in ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "digits"):
        assert name in message


def test_attack_budget_rules():
    with pytest.raises(ParamsError, match="needs at least one budget"):
        validate("grid", {"attacks": [{"name": "none"}, {"name": "rlf"}]})
    with pytest.raises(ParamsError, match="clean condition"):
        validate("grid", {"attacks": [{"name": "rlf", "budgets": [0.1]}]})
    with pytest.raises(ParamsError, match="attacks.1.name"):
        validate("grid", {"attacks": [{"name": "none"}, {"name": "flip", "budgets": [0.1]}]})


def test_preset_reports_every_problem_at_once(tmp_path):
    for kind, filename in params.PRESET_FILES.items():
        (tmp_path / filename).write_text("{}\n")
    (tmp_path / "search.yaml").write_text("device: gpu\n")
    (tmp_path / "retrain.yaml").write_text("cutout: -1\n")
    (tmp_path / "report.yaml").unlink()
    with pytest.raises(ParamsError) as e:
        load_preset(tmp_path)
    message = str(e.value)
    assert "search.yaml: device = 'gpu'" in message
    assert "retrain.yaml: cutout = -1" in message
    assert "report.yaml: missing" in message


def test_missing_preset_folder():
    with pytest.raises(ParamsError, match="does not exist"):
        load_preset("params/no-such-preset")


def test_invalid_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not valid YAML"):
        params.read_yaml(_write(tmp_path, "darts: [unclosed\n"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "file.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("preset, kinds", [
    ("quick", {"poison", "search", "retrain", "gallery", "report"}),   # DARTS' effects, powered
    ("short", {"search", "retrain", "gallery", "report"}),   # anti-search only
    ("tour", {"surrogate", "poison", "search", "retrain", "sensitivity", "defend", "gallery", "report"}),
    ("cpu", {"surrogate", "poison", "search", "retrain", "sensitivity", "report"}),
    ("paper", {"surrogate", "poison", "search", "retrain", "sensitivity", "defend", "report"}),
    ("workshop", {"poison", "search", "retrain", "report"}),
])
def test_shipped_presets_validate_and_expand(preset, kinds):
    stages = expand(load_preset(Path(__file__).resolve().parent.parent / "params" / preset))
    assert kinds <= {s.kind for s in stages}
    assert len({(s.kind, s.key) for s in stages}) == len(stages)   # no stage twice


@pytest.mark.parametrize("data, message", [
    ({"dataset": "fashion_mnist", "search_size": 100000000},
     "search_size: 100000000 is more than the 60000 images of fashion_mnist's train split"),
    ({"dataset": "digits", "train_size": 1438}, "train_size: 1438 is more than the 1437 images of digits's train split"),
    ({"dataset": "cifar10", "test_size": 10001}, "test_size: 10001 is more than the 10000 images of cifar10's test split"),
])
def test_subsets_larger_than_their_split_are_refused(data, message):
    with pytest.raises(ParamsError) as e:
        validate("grid", {"data": data}, "grid.yaml")
    assert message in str(e.value) and "grid.yaml" in str(e.value)


def test_ood_search_size_larger_than_its_split_is_refused():
    with pytest.raises(ParamsError, match="search_size: 5000 is more than the 2000 images of noise's train split"):
        validate("grid", {"ood": [{"dataset": "noise", "search_size": 5000}]}, "grid.yaml")


def test_split_sizes_are_the_loaders():
    for name in ("digits", "noise", "fashion_mnist"):
        for split in ("train", "test"):
            assert len(load_dataset(name, split)) == SPLIT_SIZES[name][split]


def test_relative_data_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = validate("grid", {"data": {"data_root": "data"}})
    assert grid.data.data_root == str(tmp_path.resolve() / "data")


def test_relative_defence_files_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    defend = validate("defend", {"denoise": {"ddpm_path": "models/ddpm"}, "relabel": {"extractor_weights": "r152.pt"}})
    assert defend.denoise["ddpm_path"] == str(tmp_path.resolve() / "models" / "ddpm")
    assert defend.relabel["extractor_weights"] == str(tmp_path.resolve() / "r152.pt")


# --- one source of truth: the engines' configs ------------------------------------------------


def test_search_sections_and_retrain_yaml_are_the_engines_configs():
    search = validate("search", {"darts": {"epochs": 3}, "robot": {"pool_size": 30}})
    assert type(search.darts) is DartsConfig and search.darts.epochs == 3 and search.darts.arch_lr == 3e-4
    assert type(search.robot) is RobotConfig and search.robot.pool_size == 30
    retrain = validate("retrain", {"epochs": 2, "device": "cpu"})
    assert isinstance(retrain, RetrainConfig) and (retrain.epochs, retrain.device) == (2, "cpu")
    assert retrain.model_dump() == {**dataclasses.asdict(RetrainConfig(epochs=2)), "device": "cpu"}


@pytest.mark.parametrize("section, values, field, rule", [
    ("pdarts", {"warmup_epochs": 30}, "warmup_epochs = 30", "cannot exceed epochs (25)"),
    ("pdarts", {"layers": [5, 11]}, "num_to_keep = (5, 3, 1)", "one entry per stage"),
    ("robot", {"pool_size": 10}, "budget = 25", "must not exceed pool_size (10)"),
    ("robot", {"lr_min": 0.5}, "lr_min = 0.5", "must not exceed lr (0.1)"),
    ("tenas", {"cells": 4}, "cells = 4", "2 or 3"),
    ("nsganetv2", {"initial_design": 5}, "initial_design = 5", "must be >= 6 when iterations > 0"),
    ("darts", {"channels": 6.5}, "channels = 6.5", "integer"),
    ("darts", {"epochs": True}, "epochs = True", "expected a number"),
])
def test_an_engine_rule_fails_alike_in_yaml_and_in_code(section, values, field, rule):
    with pytest.raises(ParamsError) as e:
        validate("search", {section: values}, "search.yaml")
    assert f"search.yaml: {section}.{field}: " in str(e.value) and rule in str(e.value)
    config = params.SEARCH_CONFIGS[section]
    with pytest.raises(ConfigError) as e:
        config(**values)
    assert f"{config.__name__}.{field}: " in str(e.value) and rule in str(e.value)


def test_configs_built_in_code_are_frozen_and_checked_again_when_copied():
    config = DartsConfig(epochs=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3
    assert dataclasses.replace(config, epochs=4).epochs == 4
    with pytest.raises(ConfigError, match="DartsConfig.keep_epochs = \\(3,\\): must lie in 0..epochs \\(2\\)"):
        dataclasses.replace(config, keep_epochs=(3,))
    with pytest.raises(ConfigError, match="DartsConfig.epoch = 3: unknown field"):
        DartsConfig(epoch=3)


@pytest.mark.parametrize("key, value", [("augment", False), ("anti", True), ("fast", False), ("keep_epochs", [1]),
                                        ("mixed_precision", True)])
def test_settings_the_run_makes_are_refused_in_a_section(key, value):
    assert key in params.SET_BY_THE_RUN
    with pytest.raises(ParamsError, match=f"search.yaml: darts: '{key}' cannot be set per algorithm"):
        validate("search", {"darts": {key: value}}, "search.yaml")


def test_every_other_engine_setting_can_be_written_in_search_yaml():
    for algorithm, config in params.SEARCH_CONFIGS.items():
        for field in dataclasses.fields(config):
            if field.name not in params.SET_BY_THE_RUN:
                value = getattr(config(), field.name)
                assert getattr(getattr(validate("search", {algorithm: {field.name: value}}), algorithm), field.name) == value


def test_settings_new_to_the_files_enter_the_stage_key_only_when_changed():
    """The keys of artifacts made before the sections became the engines' configs hold: a spec
    carries RoBoT's momentum (and the other settings the files gained) only when it is changed."""
    default, changed = validate("search", {}), validate("search", {"robot": {"momentum": 0.5}})
    assert set(default.config_of("robot")) == {"pool_size", "init_points", "iterations", "budget", "train_epochs",
                                               "train_batch_size", "lr", "lr_min", "channels", "layers",
                                               "metric_batch_size"}
    assert changed.config_of("robot") == {**default.config_of("robot"), "momentum": 0.5}
    assert default.model_dump()["robot"] == default.config_of("robot")   # the report's copy of the settings too
    key = {s: Stage("search", {"algorithm": "robot", "config": s.config_of("robot")}, "search").key
           for s in (default, changed)}
    assert key[default] != key[changed]
    assert RobotConfig(**changed.config_of("robot")) == changed.robot   # the step rebuilds the same config


TINY_ATTACKS = Path(__file__).resolve().parent / "presets" / "tiny_attacks"


def _preset_copy(tmp_path: Path, **edits: dict) -> Path:
    """tiny_attacks copied to ``tmp_path``, each file of ``edits`` with those keys replaced."""
    import shutil
    import yaml

    folder = tmp_path / "preset"
    shutil.copytree(TINY_ATTACKS, folder)
    for kind, values in edits.items():
        file = folder / f"{kind}.yaml"
        file.write_text(yaml.safe_dump({**(yaml.safe_load(file.read_text()) or {}), **values}))
    return folder


DENOISE = {"defenses": [{"name": "denoise", "attacks": ["gc"]}]}


@pytest.mark.parametrize("search_size, refused", [(1437, True), (1437 - 31, True), (1437 - 32, False)])
def test_denoising_without_a_ddpm_needs_held_out_images(tmp_path, search_size, refused):
    """tiny_attacks' defend.yaml trains the DDPM on 32 held-out images; digits has 1437."""
    grid = {**yaml_of(TINY_ATTACKS / "grid.yaml"), **DENOISE}
    grid["data"] = {**grid["data"], "search_size": search_size}
    folder = _preset_copy(tmp_path, grid=grid)
    if refused:
        with pytest.raises(ParamsError, match="denoise.ddpm_path is null.*a search_size of at most 1405"):
            load_preset(folder)
    else:
        load_preset(folder)


def test_denoising_with_a_ddpm_path_is_checked_before_compute(tmp_path):
    from nbutils.pipeline.runner import preflight

    grid = {**yaml_of(TINY_ATTACKS / "grid.yaml"), **DENOISE}
    grid["data"] = {**grid["data"], "search_size": 1437}
    defend = yaml_of(TINY_ATTACKS / "defend.yaml")
    defend["denoise"] = {**defend["denoise"], "ddpm_path": str(tmp_path / "no-ddpm")}
    preset = load_preset(_preset_copy(tmp_path, grid=grid, defend=defend))
    with pytest.raises(RuntimeError, match="defend.yaml: denoise.ddpm_path must be a local folder.*no-ddpm.*not a folder"):
        preflight(preset)
    (tmp_path / "no-ddpm" / "unet").mkdir(parents=True)
    (tmp_path / "no-ddpm" / "unet" / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="holds no scheduler"):
        preflight(preset)


def yaml_of(path: Path) -> dict:
    import yaml
    return yaml.safe_load(path.read_text())


def test_gradpc_radius_of_alphas_targets_only(tmp_path):
    """gradpc_epsilon_alphas sets GradPC's radius for the supernet targets (DARTS, P-DARTS);
    the weights targets keep gradpc_epsilon; without it, every target has gradpc_epsilon."""
    craft = yaml_of(TINY_ATTACKS / "craft_poisons.yaml")
    grid = {**yaml_of(TINY_ATTACKS / "grid.yaml"), "nas_algorithms": ["darts", "pdarts", "robot"]}
    before = {s.spec["target"]["algorithm"]: s for s in expand(load_preset(_preset_copy(tmp_path / "a", grid=grid)))
              if s.kind == "poison" and s.meta["attack"] == "gc"}
    craft["gc"] = {**craft.get("gc", {}), "gradpc_epsilon": 0.5, "gradpc_epsilon_alphas": 2.0}
    after = {s.spec["target"]["algorithm"]: s for s in expand(load_preset(_preset_copy(tmp_path / "b", grid=grid,
                                                                                        craft_poisons=craft)))
             if s.kind == "poison" and s.meta["attack"] == "gc"}
    assert {a: s.spec["attack"]["gradpc_epsilon"] for a, s in after.items()} == {"darts": 2.0, "pdarts": 2.0, "robot": 0.5}
    assert "gradpc_epsilon_alphas" not in after["darts"].spec["attack"]
    assert len({s.spec["attack"]["gradpc_epsilon"] for s in before.values()}) == 1


def test_random_sampler_and_supernet_choice_reach_the_specs(tmp_path):
    search = {**yaml_of(TINY_ATTACKS / "search.yaml"), "random_sampler": "independent", "fast": False}
    grid = {**yaml_of(TINY_ATTACKS / "grid.yaml"), "random_samples": 2}
    stages = expand(load_preset(_preset_copy(tmp_path, search=search, grid=grid)))
    random = [s for s in stages if s.kind == "search" and s.spec["algorithm"] == "random"]
    assert len(random) == 2 and all(s.spec["sampler"] == "independent" for s in random)
    crafted = [s for s in stages if s.kind == "poison" and s.meta["attack"] in ("gc", "alpha-e2")]
    assert crafted and all(s.spec["fast"] is False for s in crafted)
    default = expand(load_preset(TINY_ATTACKS))
    assert all("sampler" not in s.spec for s in default if s.kind == "search")
    assert all("fast" not in s.spec for s in default if s.kind == "poison")
