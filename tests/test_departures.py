"""The report's list of departures from the papers, from a run's settings."""
from pathlib import Path

import pytest

from nbutils.pipeline.params import PRESET_FILES, load_preset
from nbutils.report.departures import chosen_departures, departures, kept_departures

ROOT = Path(__file__).resolve().parent.parent


def settings_of(preset: str) -> dict:
    loaded = load_preset(ROOT / "params" / preset)
    return {kind: getattr(loaded, kind).model_dump() for kind in PRESET_FILES}


def test_the_paper_presets_choose_what_the_authors_ran():
    """Only the departures the implementation keeps whatever the settings."""
    for preset in ("paper", "workshop"):
        assert chosen_departures(settings_of(preset)) == []
    kept = kept_departures(settings_of("paper"))
    assert any("once-for-all" in d for d in kept) and any("Nesterov" in d for d in kept)
    assert any(d.startswith("TE-NAS's linear regions") for d in kept)
    assert kept_departures(settings_of("workshop")) == []


def test_gradpc_radius_of_the_alphas_is_checked_too():
    settings = settings_of("paper")
    settings["craft_poisons"]["gc"] = {**settings["craft_poisons"]["gc"], "gradpc_epsilon_alphas": None}
    assert any("0.5 for supernets' alphas" in d for d in chosen_departures(settings))


def test_each_chosen_departure_names_the_setting_that_restores_the_reference():
    quick = departures(settings_of("quick"))
    assert any("first-order" in d and "order: 2" in d for d in quick)
    assert any("random_sampler: independent" in d for d in quick)
    assert any("every step" in d and "lr_schedule: epoch" in d for d in quick)
    settings = settings_of("tour")
    settings["search"]["robot"] = {**settings["search"]["robot"], "metrics": ["grad_norm", "synflow_bn"]}
    settings["search"]["darts"] = {**settings["search"]["darts"], "order": 2}
    settings["search"]["random_sampler"] = "independent"
    tour = departures(settings)
    assert not any("first-order" in d or "synflow is computed" in d or "random baseline" in d for d in tour)
    assert any("theirs: predictor: rbf, cost: macs, candidate_selection: spread, finetune_epochs: 5" in d for d in tour)


@pytest.mark.parametrize("denoise, named", [({}, True), ({"ddpm_path": "/models/ddpm"}, False)])
def test_a_denoiser_trained_here_is_named(denoise, named):
    settings = settings_of("tour")
    settings["grid"]["defenses"] = [{"name": "denoise", "attacks": ["gaussian"]}]
    settings["defend"] = {**settings["defend"], "denoise": denoise}
    assert any("small DDPM trained here" in d for d in departures(settings)) == named
