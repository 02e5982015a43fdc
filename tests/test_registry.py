"""One record per NAS algorithm (nbutils/nas/registry.py): every list of algorithms derives from it."""
import pytest

from nbutils.nas import registry
from nbutils.pipeline import params, stage_params, stages, steps
from nbutils.pipeline.cost_model import cost_class, work_units
from nbutils.report import names, table_cells, tables


def test_search_yaml_has_one_section_per_algorithm_with_its_config():
    """search.yaml's sections are the registry's: each validates into its algorithm's config, with
    the config's defaults when left out, and nothing else is a section."""
    assert [name for name in params.SearchParams.model_fields if name in registry.SECTIONS] == list(registry.SECTIONS)
    defaults = params.validate("search", {})
    for algorithm in registry.ALGORITHMS.values():
        assert registry.SECTIONS[algorithm.section] is algorithm.config
        assert getattr(defaults, algorithm.section) == algorithm.config()
        section = params.validate("search", {algorithm.section: {}})
        assert type(getattr(section, algorithm.section)) is algorithm.config
    with pytest.raises(params.ParamsError, match="unknown key 'darts_anti'"):
        params.validate("search", {"darts_anti": {}})   # it shares DARTS' section
    run_settings = set(params.SearchRunParams.model_fields)
    assert set(params.SearchParams.model_fields) == run_settings | set(registry.SECTIONS)


def test_every_list_of_algorithms_is_the_registry():
    assert params.NAS_ALGORITHMS == tuple(registry.ALGORITHMS)
    assert set(steps.SEARCHES) == set(registry.ALGORITHMS)
    assert set(names.ALGORITHM_NAMES) == set(registry.ALGORITHMS) | {"random"}
    assert set(stages.SUPERNET_ALGORITHMS) == {"darts", "darts_anti", "pdarts"}
    assert set(params.LABEL_FREE) == {"tenas"} and stages.CLEAN_ONLY == ("darts_anti",)


def test_tested_against_and_metric_based_agree_with_what_the_stages_do():
    """An algorithm tested against another is clean-only and shares that algorithm's section (it
    inverts that search); the metric-based ones are exactly those whose metrics the metric
    sensitivity study can measure, and the report's and the params' lists are the registry's."""
    assert registry.TESTED_AGAINST == {"darts_anti": "darts"} and table_cells.TESTED_AGAINST is registry.TESTED_AGAINST
    for name, reference in registry.TESTED_AGAINST.items():
        assert registry.ALGORITHMS[name].clean_only and registry.ALGORITHMS[name].section == reference
    assert registry.names(metric_based=True) == ("tenas", "robot")
    assert tables.SENSITIVITY_GROUPS == stage_params.SENSITIVITY_ALGORITHMS == registry.names(metric_based=True)
    preset = params.load_preset("params/tour")
    data, poison = {"dataset": "digits"}, stages.Stage("poison", {}, "poison rlf 10%", {}, {})
    for name in registry.names(metric_based=True):
        assert stages.sensitivity_stage(preset, data, poison, name).meta["metrics_of"] == name
    for name in registry.names(metric_based=False):
        with pytest.raises(ValueError, match="no training-free metrics"):
            stages.sensitivity_stage(preset, data, poison, name)


def test_each_search_costs_what_its_record_says():
    """The cost model reads a search's work from its record: more images or epochs, more units;
    anti-search costs what DARTS costs, in DARTS' cost class."""
    defaults = params.validate("search", {})
    for algorithm in registry.ALGORITHMS.values():
        config = dict(vars(getattr(defaults, algorithm.section)))
        spec = {"algorithm": algorithm.name, "config": config, "data": {"search_size": 1000, "search_image_size": 16}}
        units = work_units("search", spec)
        if algorithm.work_units is None:
            assert units == 1.0
            continue
        larger = {**spec, "data": {"search_size": 2000, "search_image_size": 16}}
        assert 0 < units < work_units("search", larger)
        assert cost_class("search", spec) == "search " + algorithm.section
