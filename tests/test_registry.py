"""One record per NAS algorithm (nbutils/nas/registry.py): every list of algorithms derives from it."""
import pytest

from nbutils.nas import registry
from nbutils.pipeline import params, stages, steps
from nbutils.report import names


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
