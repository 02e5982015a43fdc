"""Parameter files: validated into typed specs, every problem named before any compute."""
from pathlib import Path

import pytest

from nbutils.pipeline import params
from nbutils.pipeline.params import ParamsError, load_preset, validate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset", ["params/quick", "tests/presets/tiny"])
def test_shipped_presets_validate(preset):
    p = load_preset(ROOT / preset)
    assert p.grid.trials >= 2
    assert any(a.name == "none" for a in p.grid.attacks)


def test_yaml_exponent_strings_are_numbers(tmp_path):
    # YAML 1.1 reads 3e-3 (no dot) as a string
    spec = validate("search", params.read_yaml(_write(tmp_path, "darts:\n  arch_lr: 3e-3\n  weight_decay: 1e-4\n")))
    assert spec.darts.arch_lr == pytest.approx(0.003) and isinstance(spec.darts.arch_lr, float)
    assert spec.darts.weight_decay == pytest.approx(1e-4)


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


@pytest.mark.parametrize("preset", ["quick", "cpu", "paper"])
def test_shipped_presets_validate_and_expand(preset):
    from nbutils.pipeline.stages import expand

    stages = expand(load_preset(Path(__file__).resolve().parent.parent / "params" / preset))
    kinds = {s.kind for s in stages}
    assert {"surrogate", "poison", "search", "retrain", "sensitivity", "report"} <= kinds
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
    from nbutils.core.data import SPLIT_SIZES, load_dataset

    for name in ("digits", "noise", "fashion_mnist"):
        for split in ("train", "test"):
            assert len(load_dataset(name, split)) == SPLIT_SIZES[name][split]


def test_relative_data_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = validate("grid", {"data": {"data_root": "data"}})
    assert spec.data.data_root == str(tmp_path.resolve() / "data")


def test_relative_defence_files_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = validate("defend", {"denoise": {"ddpm_path": "models/ddpm"}, "relabel": {"extractor_weights": "r152.pt"}})
    assert spec.denoise["ddpm_path"] == str(tmp_path.resolve() / "models" / "ddpm")
    assert spec.relabel["extractor_weights"] == str(tmp_path.resolve() / "r152.pt")
