"""Each field of a config a stage runs with says how it enters the stage's key
(nbutils.core.config: keyed, keyed_when_changed, set_by_run); the lists the pipeline uses derive
from those decisions."""
import dataclasses

import pytest

from nbutils.core.config import KEY_ROLES, config, key_role, key_settings, keyed, keyed_when_changed, set_by_run
from nbutils.nas import registry
from nbutils.pipeline import params
from nbutils.training.train import RetrainConfig

#: the configs whose fields a stage's spec carries: each search.yaml section, and retrain.yaml
STAGE_CONFIGS = {**registry.SECTIONS, "retrain": RetrainConfig}


@pytest.mark.parametrize("section", STAGE_CONFIGS)
def test_every_field_of_a_stage_config_decides_its_key_membership(section):
    """A field added without a decision fails here, before it can change the key of every
    artifact made before it (give it keyed_when_changed(default) unless the change is meant)."""
    undecided = [f.name for f in dataclasses.fields(STAGE_CONFIGS[section]) if key_role(f) not in KEY_ROLES]
    assert not undecided, f"{STAGE_CONFIGS[section].__name__}: fields without a key decision: {undecided}"


def test_the_pipeline_lists_derive_from_the_fields():
    assert params.SET_BY_THE_RUN == ("augment", "anti", "fast", "keep_epochs", "mixed_precision")
    assert params.KEYED_WHEN_CHANGED["darts"] == ("warmup_epochs",)
    assert set(params.KEYED_WHEN_CHANGED["robot"]) == {"momentum", "weight_decay", "grad_clip", "drop_path",
                                                       "metrics", "kappa"}
    assert "pdarts" not in params.KEYED_WHEN_CHANGED


@config
class Example:
    always: int = keyed(1)
    later: int = keyed_when_changed(2)
    run: bool = set_by_run(False)


def test_key_settings_follow_each_fields_decision():
    assert key_settings(Example()) == {"always": 1}
    assert key_settings(Example(always=3, later=4, run=True)) == {"always": 3, "later": 4}
    assert Example(run=True).run   # set by the run: a field like any other for the engine
