"""One record per NAS algorithm (nbutils/nas/registry.py): every list of algorithms derives from it."""
import dataclasses

from nbutils.nas import registry
from nbutils.pipeline import params, stages, steps
from nbutils.report import names


def test_search_yaml_has_one_section_per_algorithm_with_its_config():
    """search.yaml's sections are declared as fields of SearchParams: they must be the registry's."""
    configs = {a.config for a in registry.ALGORITHMS.values()}
    sections = {name: field.annotation for name, field in params.SearchParams.model_fields.items()
                if field.annotation in configs}
    assert sections == registry.SECTIONS
    for algorithm in registry.ALGORITHMS.values():
        assert registry.SECTIONS[algorithm.section] is algorithm.config


def test_every_list_of_algorithms_is_the_registry():
    assert params.NAS_ALGORITHMS == tuple(registry.ALGORITHMS)
    assert set(steps.SEARCHES) == set(registry.ALGORITHMS)
    assert set(names.ALGORITHM_NAMES) == set(registry.ALGORITHMS) | {"random"}
    assert set(stages.SUPERNET_ALGORITHMS) == {"darts", "darts_anti", "pdarts"}
    assert set(params.LABEL_FREE) == {"tenas"} and stages.CLEAN_ONLY == ("darts_anti",)


def test_settings_keyed_when_changed_are_fields_of_their_config():
    for algorithm in registry.ALGORITHMS.values():
        fields = {f.name for f in dataclasses.fields(algorithm.config)}
        assert set(algorithm.keyed_when_changed) <= fields, algorithm.name
