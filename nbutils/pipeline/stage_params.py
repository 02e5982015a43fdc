"""The params of the files that say how each kind of stage runs: craft_poisons.yaml (the attacks),
search.yaml (one section per NAS algorithm, from the registry), retrain.yaml, metric_sensitivity.yaml,
defend.yaml and report.yaml. Their sections are the engines' configs, or made of their fields
(:func:`config_fields`), so each setting is declared and checked once, in the engine."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import (Field, SerializerFunctionWrapHandler, TypeAdapter, create_model, field_serializer,
                      field_validator, model_serializer, model_validator)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ..attacks.poisoning import AttackConfig
from ..attacks.registry import CRAFTING_FIELDS
from ..core.config import (CONFIG_RULES, Cells, Channels, EachOnce, PositiveInt, PositiveNumber, Seed, fields_with_role,
                           integer, key_settings, number)
from ..core.store import LOCAL_FILES
from ..defenses.defending import DefenseConfig
from ..defenses.registry import DEFENSE_SETTINGS, DEFENSES
from ..nas import registry
from ..training.train import RetrainConfig
from .params_base import Device, Params


# --- craft_poisons.yaml ------------------------------------------------------------------------
class SurrogateParams(Params):
    """CLF's surrogate ResNet-18, trained once per dataset and seed on the clean search data."""

    epochs: PositiveInt = 40
    batch_size: PositiveInt = 128
    lr: PositiveNumber = 0.1


def config_fields(config: type, *names: str) -> type[Params]:
    """A params model of the fields ``names`` of the config class ``config``, with the config's
    types, ranges and defaults: a section that sets some of a config's fields declares none of
    them again, and a value in the file passes the config's own checks (reported with its key)."""
    fields = config.__pydantic_fields__
    return create_model(f"{config.__name__}Fields", __base__=Params,
                        **{name: (fields[name].annotation, fields[name]) for name in names})


class GradientCancelingParams(config_fields(AttackConfig, *CRAFTING_FIELDS["gc"])):
    """craft_poisons.yaml's ``gc``: gradient canceling's fields of
    :class:`~nbutils.attacks.poisoning.AttackConfig` (``lr: null``: the recipe's default;
    ``gradpc_steps: null``: one pass over the data), and ``gradpc_epsilon_alphas``, GradPC's
    radius when the target is a supernet's alphas (P-DARTS, DARTS; null: ``gradpc_epsilon``).
    The audit's files name eps=0.5 for the weights targets (TE-NAS, RoBoT) and eps=1.0 for
    P-DARTS' alphas (:mod:`nbutils.attacks.gradient_canceling` gives the evidence)."""

    gradpc_epsilon_alphas: Optional[PositiveNumber] = None


class AlphaAttackParams(config_fields(AttackConfig, *CRAFTING_FIELDS["alpha"])):
    """craft_poisons.yaml's ``alpha``: the alpha attack's fields of
    :class:`~nbutils.attacks.poisoning.AttackConfig` (``lr: null``: Witches' Brew's rule)."""


class CraftPoisonsParams(config_fields(AttackConfig, "seed", "eps", "sigma")):
    """craft_poisons.yaml: the settings every attack shares (``seed``: which samples are
    poisoned, and the noise drawn; ``eps`` and ``sigma`` in pixel units), each crafted attack's
    own, all :class:`~nbutils.attacks.poisoning.AttackConfig` fields; and CLF's surrogate."""

    device: Device = "auto"
    surrogate: SurrogateParams = SurrogateParams()
    gc: GradientCancelingParams = GradientCancelingParams()
    alpha: AlphaAttackParams = AlphaAttackParams()

    def attack_config(self, name: str, budget: float, target: str | None = None) -> dict:
        """The :class:`~nbutils.attacks.poisoning.AttackConfig` fields of one attack at one budget:
        the shared ones, and a crafted attack's own (gradient canceling's GradPC radius by its
        ``target``: ``alphas`` or ``weights``)."""
        fields = {"name": name, "budget": budget, "seed": self.seed, "eps": self.eps, "sigma": self.sigma}
        if name in CRAFTING_FIELDS:
            fields.update(getattr(self, name).model_dump(exclude={"gradpc_epsilon_alphas"}))
        if name == "gc" and target == "alphas" and self.gc.gradpc_epsilon_alphas is not None:
            fields["gradpc_epsilon"] = self.gc.gradpc_epsilon_alphas
        return fields


# --- search.yaml -------------------------------------------------------------------------------
#: the engine config each algorithm section of search.yaml is (``darts_anti`` shares DARTS')
SEARCH_CONFIGS: dict[str, type] = registry.SECTIONS

#: config fields the run sets for each search, so no section may (each field says so,
#: :func:`~nbutils.core.config.set_by_run`): search.yaml's own ``augment``, ``fast`` and
#: ``mixed_precision`` (for every algorithm), ``anti`` (the darts_anti algorithm) and ``keep_epochs``
#: (the supernets the crafted attacks read)
SET_BY_THE_RUN: tuple[str, ...] = tuple(dict.fromkeys(
    name for config in SEARCH_CONFIGS.values() for name in fields_with_role(config, "set_by_run")))

#: settings the sections gained when they became the engines' configs (each field says so,
#: :func:`~nbutils.core.config.keyed_when_changed`): a stage's key holds one only when it differs
#: from its default, so that every artifact made before keeps its key
KEYED_WHEN_CHANGED: dict[str, tuple[str, ...]] = {
    section: fields for section, config in SEARCH_CONFIGS.items()
    if (fields := fields_with_role(config, "keyed_when_changed"))}


#: the sections whose searches ``mixed_precision`` applies to (DARTS' and P-DARTS')
MIXED_PRECISION_SECTIONS = tuple(dict.fromkeys(a.section for a in registry.ALGORITHMS.values() if a.mixed_precision))


class SearchRunParams(Params):
    """search.yaml's settings for every search: where and how they run. :data:`SearchParams`
    adds one section per algorithm; the checks of the sections are declared here."""

    device: Device = "auto"
    augment: bool = True     # random crop and flip during the search (TMLR Table 6 turns it off)
    fast: bool = True        # the fast supernet; false: the plain one (the executable specification)
    mixed_precision: bool = False   # DARTS and P-DARTS on CUDA: float16 autocast with gradient scaling (order 1)
    # the random baseline's sampler: distinct (each node reads two different states) or independent
    # (each input drawn on its own, so a node may read one state twice: the audit authors' sampler)
    random_sampler: Literal["distinct", "independent"] = "distinct"

    @field_validator(*SEARCH_CONFIGS, mode="before", check_fields=False)
    @classmethod
    def _no_run_settings(cls, section: Any) -> Any:
        if isinstance(section, dict):
            for key in SET_BY_THE_RUN:
                if key in section:
                    raise ValueError(f"{key!r} cannot be set per algorithm (value {section[key]!r}): the run sets "
                                     f"it for each search (search.yaml's augment, fast and mixed_precision apply to "
                                     f"every algorithm; darts_anti is DARTS' anti-search)")
        return section

    @model_validator(mode="after")
    def _mixed_precision_first_order(self) -> "SearchRunParams":
        if self.mixed_precision:
            second = [name for name in MIXED_PRECISION_SECTIONS if getattr(self, name).order == 2]
            if second:
                raise ValueError(f"mixed_precision supports the first-order search only: set order: 1 in "
                                 f"{' and '.join(second)}, or mixed_precision: false")
        return self

    @field_serializer(*SEARCH_CONFIGS, check_fields=False)
    def _section_settings(self, config: Any) -> dict:
        return key_settings(config)

    def config_of(self, algorithm: str) -> dict:
        """The settings a search stage of ``algorithm`` runs with (:func:`~nbutils.core.config.key_settings`)."""
        if algorithm == "random":
            return {}
        return key_settings(getattr(self, registry.ALGORITHMS[algorithm].section))


SearchParams = create_model(
    "SearchParams", __base__=SearchRunParams, __module__=__name__,
    __doc__="""search.yaml: where and how every search runs (:class:`SearchRunParams`), and one
    section per algorithm of the registry (:data:`~nbutils.nas.registry.SECTIONS`, so that the
    registry is the one list), each the algorithm's engine config: its fields, ranges, defaults
    and checks are declared there.""",
    **{section: (config, config()) for section, config in SEARCH_CONFIGS.items()})


# --- retrain.yaml ------------------------------------------------------------------------------
@pydantic_dataclass(frozen=True, config=CONFIG_RULES)
class RetrainParams(RetrainConfig):
    """retrain.yaml: the retraining's config (:class:`~nbutils.training.train.RetrainConfig`, which
    declares and checks its fields) and the device it runs on."""

    device: Device = "auto"

    def model_dump(self, **options: Any) -> dict:
        """The file's values, as every other file's params give them (pydantic's ``model_dump``)."""
        return TypeAdapter(RetrainParams).dump_python(self, **options)


# --- metric_sensitivity.yaml (TMLR Table 2) -----------------------------------------------------
#: the algorithms whose training-free metrics TMLR Table 2 measures
SENSITIVITY_ALGORITHMS = registry.names(metric_based=True)


class MetricSensitivityParams(Params):
    """Each training-free metric on clean and on poisoned data, same random architectures: one
    study per poison set and algorithm of ``algorithms`` (gradient canceling: the poisons crafted
    against that algorithm). TE-NAS's kappa and R are measured with search.yaml's ``tenas``
    settings (``nbutils.studies.tenas_indicators``); ``batch_size``, ``channels`` and ``layers``
    are RoBoT's network's."""

    run: bool = True
    architectures: PositiveInt = 100    # random architectures (paper: 100)
    samples: integer(2) = 1000   # search images the metrics see (paper: 1000)
    batch_size: integer(2) = 64
    channels: Channels = 16
    layers: Cells = 5
    seed: Seed = 0
    device: Device = "auto"
    algorithms: Annotated[list[Literal[SENSITIVITY_ALGORITHMS]], Field(min_length=1), EachOnce] = list(SENSITIVITY_ALGORITHMS)  # type: ignore[valid-type]
    tenas_network: Literal["architecture", "supernet"] = "architecture"   # supernet: as sample_metrics.py

    @model_serializer(mode="wrap")
    def _new_settings_when_changed(self, handler: SerializerFunctionWrapHandler) -> dict:
        """``algorithms`` and ``tenas_network``, added with TE-NAS's columns, only when changed:
        the report's key hashes every file's settings, and stays as it was for a preset that
        keeps the defaults (as :data:`KEYED_WHEN_CHANGED` does for the search sections)."""
        data = handler(self)
        for name in ("algorithms", "tenas_network"):
            if name in data and data[name] == type(self).model_fields[name].default:
                del data[name]
        return data


# --- defend.yaml (TMLR Table 4) -----------------------------------------------------------------


class DefendParams(Params):
    """Settings of each defence (:class:`~nbutils.defenses.defending.DefenseConfig` fields, checked there);
    grid.yaml says which run."""

    run: bool = True
    seed: Seed = 0
    device: Device = "auto"
    sanitise: dict = {}
    relabel: dict = {}
    denoise: dict = {}

    @field_validator(*DEFENSES)
    @classmethod
    def _absolute_paths(cls, settings: dict) -> dict:
        """Local files (``ddpm_path``, ``extractor_weights``) given relative to the working
        directory of the run, made absolute before they reach a notebook (run in ``notebooks/``)."""
        return {key: str(Path(value).expanduser().resolve()) if key in LOCAL_FILES and isinstance(value, str) and value
                else value for key, value in settings.items()}

    @model_validator(mode="after")
    def _settings_valid(self) -> "DefendParams":
        for name in DEFENSES:
            for key in getattr(self, name):
                owner = next((d for d, keys in DEFENSE_SETTINGS.items() if key in keys), None)
                if owner != name and key not in ("name", "seed"):
                    where = f"a setting of {owner}, not of {name}" if owner else "not a setting of any defence"
                    raise ValueError(f"{name}.{key} = {getattr(self, name)[key]!r}: {where}; {name}'s settings: "
                                     + ", ".join(DEFENSE_SETTINGS[name]))
            try:
                DefenseConfig(name=name, seed=self.seed, **getattr(self, name))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}: {e}") from None
        return self

    def defense_config(self, name: str) -> dict:
        """The :class:`~nbutils.defenses.defending.DefenseConfig` fields of one defence."""
        return {"name": name, "seed": self.seed, **getattr(self, name)}


# --- report.yaml -------------------------------------------------------------------------------
class ReportParams(Params):
    title: str = "Does neural architecture search survive poisoned data?"
    alpha: number(gt=0, lt=1) = 0.05   # significance level (BH false discovery rate)
