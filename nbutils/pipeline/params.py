"""Parameter files: one YAML file per notebook per preset, under ``params/<preset>/``,
validated into typed params before anything runs.

Words (:mod:`nbutils.core.config` says more): the *params* (``*Params``, this module) are a
parameter file's validated contents; a *config* (``*Config``) is what an engine function runs
with, and the search sections of search.yaml and the whole of retrain.yaml *are* the engines'
configs (:class:`~nbutils.nas.darts.DartsConfig`, ..., :class:`~nbutils.training.train.RetrainConfig`),
so every setting is declared and checked once, in the engine; a *spec* is a stage's plain-JSON
parameters (:mod:`nbutils.pipeline.stages`), which hold a config's fields under ``config``.

Unknown keys, wrong types and out-of-range values fail with the file, the key, the value
and what is allowed. YAML 1.1 reads ``1e-3`` as a string; numbers written that way are
accepted as numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, FieldSerializationInfo, SerializerFunctionWrapHandler, TypeAdapter,
                      ValidationError, create_model, field_serializer, field_validator, model_serializer,
                      model_validator, Tag)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ..attacks.poisoning import CRAFTING_FIELDS, AttackConfig
from ..core.config import (CONFIG_RULES, Cells, Channels, EachOnce, MAX_REPEATS, PositiveInt,
                           PositiveNumber, Repeats, Seed, integer, integer_within, number)
from ..core.datasets import DATASETS, SPLIT_SIZES
from ..defenses.defending import DEFENSE_SETTINGS, DefenseConfig
from ..nas import registry
from ..nas.darts import DartsConfig
from ..nas.nsganetv2 import Nsganetv2Config
from ..nas.pdarts import PdartsConfig
from ..nas.robot import RobotConfig
from ..nas.tenas import TenasConfig
from ..training.train import RetrainConfig

DatasetName = Literal[DATASETS]  # type: ignore[valid-type]
Device = Literal["auto", "cpu", "cuda"]
Budget = Annotated[number(gt=0, le=1), Field(description="fraction of the search data, in (0, 1]")]
ImageSide = integer(8)
RandomSamples = integer_within(0, MAX_REPEATS, "far beyond any study; the papers sample 10 to 100")
SearchSize = integer_within(2, None, "the search splits its images into two halves: weights and architecture")

NAS_ALGORITHMS = tuple(registry.ALGORITHMS)   # darts_anti: the workshop paper's anti-search, Table 1
LABEL_FREE = registry.names(label_free=True)    # never read labels: label flipping cannot change what they find
ATTACK_NAMES = ("none", "rlf", "clf", "gaussian", "gc", "alpha")
#: NAS algorithms named in a list, each once
Algorithms = Annotated[list[Literal[NAS_ALGORITHMS]], EachOnce]  # type: ignore[valid-type]

PRESET_FILES = {
    "grid": "grid.yaml",
    "craft_poisons": "craft_poisons.yaml",
    "search": "search.yaml",
    "retrain": "retrain.yaml",
    "metric_sensitivity": "metric_sensitivity.yaml",
    "defend": "defend.yaml",
    "report": "report.yaml",
}
OPTIONAL_FILES = ("metric_sensitivity", "defend")   # a preset without the file does not run that study


class ParamsError(ValueError):
    """A parameter file that cannot be used; the message names every problem."""


class Params(BaseModel):
    """A parameter file or a part of one: frozen, unknown keys refused, no NaN or infinities."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- grid.yaml: what runs ---------------------------------------------------------------------
class DataParams(Params):
    dataset: DatasetName = "fashion_mnist"
    data_root: Optional[str] = None
    download: bool = False
    subset_seed: Seed = 0   # which images the subsets below take
    search_size: Optional[SearchSize] = None   # training images the search sees (None: all)
    search_image_size: Optional[ImageSide] = None
    train_size: Optional[PositiveInt] = None    # clean training images for retraining (None: all)
    test_size: Optional[PositiveInt] = None     # test images for the final accuracy (None: all)
    image_size: Optional[ImageSide] = None

    @field_validator("data_root")
    @classmethod
    def _absolute_data_root(cls, root: Optional[str]) -> Optional[str]:
        """A relative ``data_root`` is taken from the working directory of the run and made
        absolute here, before it reaches a notebook (whose kernel runs in ``notebooks/``)."""
        return None if root in (None, "") else str(Path(root).expanduser().resolve())

    @model_validator(mode="after")
    def _sizes_fit_the_splits(self) -> "DataParams":
        check_sizes_fit(self.dataset, {"search_size": ("train", self.search_size),
                                       "train_size": ("train", self.train_size),
                                       "test_size": ("test", self.test_size)})
        return self


def check_sizes_fit(dataset: str, sizes: dict[str, tuple[str, Optional[int]]]) -> None:
    """Refuse a subset larger than the split it is drawn from (``sizes``: key -> (split, size)),
    naming the key, the value and the split's size: before any compute, not at stage time."""
    for key, (split, size) in sizes.items():
        available = SPLIT_SIZES[dataset][split]
        if size is not None and size > available:
            raise ValueError(f"{key}: {size} is more than the {available} images of {dataset}'s {split} split "
                             f"(allowed: 1..{available}, or null for all of them)")


#: grid.yaml's ``data``: one mapping or a list of them, told apart before validation so that an
#: error names ``data.dataset`` (or ``data.1.dataset``), not both readings (the tags are dropped
#: from error paths by :func:`_format_errors`)
DATA_TAGS = ("one", "several")
DataChoice = Annotated[
    Union[Annotated[DataParams, Tag("one")],
          Annotated[Annotated[list[DataParams], Field(min_length=1), EachOnce], Tag("several")]],
    Discriminator(lambda value: "several" if isinstance(value, list) else "one"),
]


class AttackEntry(Params):
    name: Literal[ATTACK_NAMES]  # type: ignore[valid-type]
    budgets: Annotated[list[Budget], EachOnce] = []
    ensemble: Optional[PositiveInt] = None   # alpha only: supernets in the ensemble (workshop: e=1 or 6)
    algorithms: Optional[Algorithms] = None   # default: every one

    @model_validator(mode="after")
    def _budgets_match_name(self) -> "AttackEntry":
        if self.name == "none" and self.budgets:
            raise ValueError("attack 'none' takes no budgets")
        if self.name != "none" and not self.budgets:
            raise ValueError(f"attack {self.name!r} needs at least one budget in (0, 1]")
        if self.ensemble is not None and self.name != "alpha":
            raise ValueError(f"ensemble applies to the alpha attack only, not {self.name!r}")
        return self

    @property
    def condition(self) -> str:
        """The name the report groups by: the attack, with the alpha attack's ensemble size."""
        return f"alpha-e{self.ensemble or 1}" if self.name == "alpha" else self.name


class OodEntry(Params):
    """Search on another dataset, retrain on the grid's (TMLR Table 3)."""

    dataset: DatasetName    # the search data (noise: pure random images)
    search_size: Optional[SearchSize] = None
    search_image_size: Optional[ImageSide] = None
    algorithms: Optional[Algorithms] = None   # default: every one

    @model_validator(mode="after")
    def _size_fits_the_split(self) -> "OodEntry":
        check_sizes_fit(self.dataset, {"search_size": ("train", self.search_size)})
        return self


class DefenseEntry(Params):
    """One defence applied to poisoned search data before the search (TMLR Table 4)."""

    name: Literal["sanitise", "relabel", "denoise"]
    attacks: Annotated[list[str], Field(min_length=1), EachOnce]   # the conditions it defends (e.g. rlf, gc)
    algorithms: Optional[Algorithms] = None   # default: every one
    budgets: Optional[Annotated[list[Budget], EachOnce]] = None   # default: every budget of those attacks (TMLR Table 4: 50% only)


class GridParams(Params):
    """grid.yaml: what runs. ``data`` is one dataset (a mapping) or several (a list of mappings,
    TMLR Table 1's CIFAR-10 and CIFAR-100): the main study (every algorithm under every attack,
    its clean reference, the random baseline) runs on each, and the report shows one table per
    dataset, each cell tested against the clean trials of its own algorithm and dataset. The
    other studies (defences, out-of-distribution search, the augmentation ablation, metric
    sensitivity) run on the first dataset, the *primary* one, as the TMLR paper runs its
    Tables 2-4 and 6 on CIFAR-10 only."""

    data: DataChoice = DataParams()
    defenses: Annotated[list[DefenseEntry], EachOnce] = []
    ood: Annotated[list[OodEntry], EachOnce] = []   # out-of-distribution searches, clean, per algorithm
    augmentation_ablation: Algorithms = []   # TMLR Table 6
    trials: Repeats = 2
    seed: Seed = 0
    nas_algorithms: Annotated[Algorithms, Field(min_length=1)] = ["darts"]
    attacks: Annotated[list[AttackEntry], Field(min_length=1), EachOnce] = [AttackEntry(name="none")]
    random_samples: RandomSamples = 10

    @field_validator("data")
    @classmethod
    def _distinct_datasets(cls, data: DataParams | list[DataParams]) -> DataParams | list[DataParams]:
        names = [d.dataset for d in data] if isinstance(data, list) else [data.dataset]
        if len(set(names)) != len(names):
            raise ValueError(f"each dataset may appear once in data (its tables are named by it), got {names}")
        return data

    @property
    def datasets(self) -> list[DataParams]:
        """Every dataset of the main study, the primary one first."""
        return list(self.data) if isinstance(self.data, list) else [self.data]

    @property
    def primary(self) -> DataParams:
        """The dataset the defences, out-of-distribution searches, augmentation ablation and
        metric sensitivity run on: the first of ``data``."""
        return self.datasets[0]

    @field_validator("attacks")
    @classmethod
    def _clean_condition_present(cls, attacks: list[AttackEntry]) -> list[AttackEntry]:
        if not any(a.name == "none" for a in attacks):
            raise ValueError("the attacks must include {name: none}: the clean condition every test compares against")
        if sum(a.name == "none" for a in attacks) > 1:
            raise ValueError("{name: none} may appear once: it is the one clean condition")
        return attacks

    @model_validator(mode="after")
    def _each_cell_once(self) -> "GridParams":
        """An attack may have several entries (per-algorithm budgets: the workshop runs RLF on
        DARTS at 5%, TMLR on P-DARTS at 1, 10 and 50%), but each (attack, budget, algorithm) cell
        comes from one entry."""
        owner: dict[tuple[str, float, str], int] = {}
        for i, entry in enumerate(self.attacks):
            for budget in entry.budgets:
                for algorithm in self.attacked(entry):
                    cell = (entry.condition, budget, algorithm)
                    if cell in owner:
                        raise ValueError(f"attack {entry.condition!r} at budget {budget:g} on {algorithm} is in entries "
                                         f"{owner[cell]} and {i}: give each budget of an algorithm once")
                    owner[cell] = i
        return self

    @model_validator(mode="after")
    def _each_ood_search_once(self) -> "GridParams":
        """Each (search dataset, algorithm) comes from one ``ood`` entry: the report has one cell
        per pair, and two entries would count its trials twice."""
        owner: dict[tuple[str, str], int] = {}
        for i, entry in enumerate(self.ood):
            for algorithm in entry.algorithms or self.nas_algorithms:
                if (entry.dataset, algorithm) in owner:
                    raise ValueError(f"ood: the search of {algorithm} on {entry.dataset} is in entries "
                                     f"{owner[entry.dataset, algorithm]} and {i}; give it once")
                owner[entry.dataset, algorithm] = i
        return self

    @model_validator(mode="after")
    def _each_defended_cell_once(self) -> "GridParams":
        """Each (defence, attack, budget, algorithm) comes from one ``defenses`` entry."""
        owner: dict[tuple, int] = {}
        for i, entry in enumerate(self.defenses):
            for attack in self.attacks:
                if attack.condition not in entry.attacks:
                    continue
                for budget in [b for b in attack.budgets if entry.budgets is None or b in entry.budgets]:
                    for algorithm in self.attacked(attack):
                        if entry.algorithms is not None and algorithm not in entry.algorithms:
                            continue
                        cell = (entry.name, attack.condition, budget, algorithm)
                        if cell in owner:
                            raise ValueError(f"defense {entry.name!r} of attack {attack.condition!r} at budget {budget:g} "
                                             f"on {algorithm} is in entries {owner[cell]} and {i}; give it once")
                        owner[cell] = i
        return self

    @model_validator(mode="after")
    def _attacked_algorithms_searched(self) -> "GridParams":
        for a in self.attacks:
            extra = sorted(set(a.algorithms or ()) - set(self.nas_algorithms))
            if extra:
                raise ValueError(f"attack {a.condition!r} names algorithms {extra} that nas_algorithms does not search")
        return self

    @model_validator(mode="after")
    def _ablation_searched(self) -> "GridParams":
        extra = sorted(set(self.augmentation_ablation) - set(self.nas_algorithms))
        if extra:
            raise ValueError(f"augmentation_ablation names algorithms {extra} that nas_algorithms does not search")
        if self.augmentation_ablation and not any(a.name == "gc" for a in self.attacks):
            raise ValueError("augmentation_ablation repeats gradient canceling without search augmentation: "
                             "the attacks must include gc")
        return self

    @model_validator(mode="after")
    def _defended_attacks_exist(self) -> "GridParams":
        conditions = {a.condition for a in self.attacks if a.name != "none"}
        for d in self.defenses:
            unknown = sorted(set(d.attacks) - conditions)
            if unknown:
                raise ValueError(f"defense {d.name!r} names attacks {unknown} the grid does not run; "
                                 f"allowed: {sorted(conditions)}")
            extra = sorted(set(d.algorithms or ()) - set(self.nas_algorithms))
            if extra:
                raise ValueError(f"defense {d.name!r} names algorithms {extra} that nas_algorithms does not search")
            budgets = {b for a in self.attacks if a.condition in d.attacks for b in a.budgets}
            missing = sorted(set(d.budgets or ()) - budgets)
            if missing:
                raise ValueError(f"defense {d.name!r} names budgets {missing} that none of its attacks "
                                 f"{d.attacks} runs; allowed: {sorted(budgets)}")
        return self

    @model_validator(mode="after")
    def _label_attacks_need_labels(self) -> "GridParams":
        for a in self.attacks:
            named = sorted(set(a.algorithms or ()) & set(LABEL_FREE))
            if a.name in ("rlf", "clf") and named:
                raise ValueError(f"attack {a.name!r} only changes labels, which {named} never read (TMLR Table 1 "
                                 "marks these cells '-'); remove them from its algorithms")
        return self

    def attacked(self, attack: AttackEntry) -> list[str]:
        """The algorithms an attack runs against, in nas_algorithms order; label flipping
        skips the label-free algorithms (the report marks those cells '-' with the reason)."""
        return [a for a in self.nas_algorithms if (attack.algorithms is None or a in attack.algorithms)
                and not (attack.name in ("rlf", "clf") and a in LABEL_FREE)]

    @model_validator(mode="after")
    def _attack_targets_exist(self) -> "GridParams":
        if any(a.name == "alpha" for a in self.attacks) and "darts" not in self.nas_algorithms:
            raise ValueError("the alpha attack crafts its poisons on clean DARTS supernets: "
                             "nas_algorithms must include darts")
        return self


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

#: config fields the run sets for each search, so no section may: search.yaml's own ``augment``,
#: ``fast`` and ``mixed_precision`` (for every algorithm), ``anti`` (the darts_anti algorithm) and
#: ``keep_epochs`` (the supernets the crafted attacks read)
SET_BY_THE_RUN = ("augment", "anti", "fast", "keep_epochs", "mixed_precision")

#: settings the sections gained when they became the engines' configs: a stage's key holds one
#: only when it differs from its default, so that every artifact made before keeps its key
KEYED_WHEN_CHANGED: dict[str, tuple[str, ...]] = {a.section: a.keyed_when_changed for a in registry.ALGORITHMS.values()
                                                  if a.keyed_when_changed}


def section_settings(algorithm: str, config: Any) -> dict:
    """The settings of a search section that a stage's spec carries (and its key hashes): every
    field but those set by the run, and each of :data:`KEYED_WHEN_CHANGED` only when changed."""
    defaults = type(config)()
    later = KEYED_WHEN_CHANGED.get(algorithm, ())
    return {name: value for name, value in TypeAdapter(type(config)).dump_python(config).items()
            if name not in SET_BY_THE_RUN and not (name in later and value == getattr(defaults, name))}


class SearchParams(Params):
    """search.yaml: where and how every search runs, and one section per algorithm, each the
    algorithm's engine config (its fields, ranges, defaults and checks are declared there)."""

    device: Device = "auto"
    augment: bool = True     # random crop and flip during the search (TMLR Table 6 turns it off)
    fast: bool = True        # the fast supernet; false: the plain one (the executable specification)
    mixed_precision: bool = False   # DARTS and P-DARTS on CUDA: float16 autocast with gradient scaling (order 1)
    # the random baseline's sampler: distinct (each node reads two different states) or independent
    # (each input drawn on its own, so a node may read one state twice: the audit authors' sampler)
    random_sampler: Literal["distinct", "independent"] = "distinct"
    darts: DartsConfig = DartsConfig()
    pdarts: PdartsConfig = PdartsConfig()
    tenas: TenasConfig = TenasConfig()
    robot: RobotConfig = RobotConfig()
    nsganetv2: Nsganetv2Config = Nsganetv2Config()

    @field_validator(*SEARCH_CONFIGS, mode="before")
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
    def _mixed_precision_first_order(self) -> "SearchParams":
        if self.mixed_precision:
            second = [name for name in ("darts", "pdarts") if getattr(self, name).order == 2]
            if second:
                raise ValueError(f"mixed_precision supports the first-order search only: set order: 1 in "
                                 f"{' and '.join(second)}, or mixed_precision: false")
        return self

    @field_serializer(*SEARCH_CONFIGS)
    def _section_settings(self, config: Any, info: FieldSerializationInfo) -> dict:
        return section_settings(info.field_name, config)

    def config_of(self, algorithm: str) -> dict:
        """The settings a search stage of ``algorithm`` runs with (:func:`section_settings`)."""
        if algorithm == "random":
            return {}
        family = registry.ALGORITHMS[algorithm].section
        return section_settings(family, getattr(self, family))


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
SENSITIVITY_ALGORITHMS = ("tenas", "robot")


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
#: defence settings that name a local file or folder
LOCAL_FILES = ("ddpm_path", "extractor_weights")


class DefendParams(Params):
    """Settings of each defence (:class:`~nbutils.defenses.defending.DefenseConfig` fields, checked there);
    grid.yaml says which run."""

    run: bool = True
    seed: Seed = 0
    device: Device = "auto"
    sanitise: dict = {}
    relabel: dict = {}
    denoise: dict = {}

    @field_validator("sanitise", "relabel", "denoise")
    @classmethod
    def _absolute_paths(cls, settings: dict) -> dict:
        """Local files (``ddpm_path``, ``extractor_weights``) given relative to the working
        directory of the run, made absolute before they reach a notebook (run in ``notebooks/``)."""
        return {key: str(Path(value).expanduser().resolve()) if key in LOCAL_FILES and isinstance(value, str) and value
                else value for key, value in settings.items()}

    @model_validator(mode="after")
    def _settings_valid(self) -> "DefendParams":
        for name in ("sanitise", "relabel", "denoise"):
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


#: each file's params: pydantic models, but retrain.yaml's, a config (a pydantic dataclass), so
#: they are validated through pydantic's TypeAdapter, which takes both
FILE_PARAMS: dict[str, type] = {
    "grid": GridParams,
    "craft_poisons": CraftPoisonsParams,
    "search": SearchParams,
    "retrain": RetrainParams,
    "metric_sensitivity": MetricSensitivityParams,
    "defend": DefendParams,
    "report": ReportParams,
}


class Preset(Params):
    name: str
    path: str
    grid: GridParams
    craft_poisons: CraftPoisonsParams
    search: SearchParams
    retrain: RetrainParams
    metric_sensitivity: MetricSensitivityParams
    defend: DefendParams
    report: ReportParams

    @model_validator(mode="after")
    def _defenses_configured(self) -> "Preset":
        if self.grid.defenses and not self.defend.run:
            raise ValueError("grid.yaml lists defenses but the preset has no defend.yaml (or it says run: false)")
        return self

    @model_validator(mode="after")
    def _denoiser_has_training_images(self) -> "Preset":
        """Denoising without ``ddpm_path`` trains a DDPM on clean training images the defender
        holds out of the search data: refuse a preset that leaves too few (at stage time every
        denoise stage would fail)."""
        if not any(d.name == "denoise" for d in self.grid.defenses) or self.defend.denoise.get("ddpm_path"):
            return self
        denoise = DefenseConfig(name="denoise", seed=self.defend.seed, **self.defend.denoise)
        data = self.grid.primary
        total = SPLIT_SIZES[data.dataset]["train"]
        held_out = total - (data.search_size or total)
        if held_out < denoise.ddpm_trusted_size:
            raise ValueError(
                f"defend.yaml: denoise.ddpm_path is null, so denoising trains a DDPM on ddpm_trusted_size = "
                f"{denoise.ddpm_trusted_size} clean training images held out of the search data, but grid.yaml's "
                f"data.search_size ({data.search_size or 'null: all'}) leaves {held_out} of {data.dataset}'s {total}; "
                f"give ddpm_path (a local diffusers DDPM folder), or a search_size of at most "
                f"{total - denoise.ddpm_trusted_size}, or a smaller ddpm_trusted_size")
        return self

    @model_validator(mode="after")
    def _sensitivity_has_tenas_batches(self) -> "Preset":
        sensitivity, tenas = self.metric_sensitivity, self.search.tenas
        if sensitivity.run and "tenas" in sensitivity.algorithms and sensitivity.samples < tenas.repeats * tenas.batch_size:
            raise ValueError(f"metric_sensitivity.yaml: samples ({sensitivity.samples}) must hold TE-NAS's NTK batches, "
                             f"search.yaml's tenas repeats x batch_size = {tenas.repeats} x {tenas.batch_size}")
        return self


#: pydantic's error types for a key the model does not have (models, dataclasses)
UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")


def _format_errors(source: str, error: ValidationError) -> list[str]:
    """One line per problem: the file, the key path, the value and the rule (a rule about a whole
    mapping, e.g. across its keys, names the mapping's path without repeating its values)."""
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for i, p in enumerate(e["loc"])
                         if not (i and e["loc"][i - 1] == "data" and p in DATA_TAGS)) or "(top level)"
        value = e.get("input")
        rule = e["msg"].removeprefix("Value error, ")
        if e["type"] in UNKNOWN_KEY:
            lines.append(f"{source}: unknown key {where!r} (value {value!r})")
        elif isinstance(value, dict):
            lines.append(f"{source}: {where}: {rule}")
        else:
            lines.append(f"{source}: {where} = {value!r}: {rule}")
    return lines


def validate(kind: str, values: dict | None, source: str = "<dict>") -> Any:
    """Validate one file's values into its params; raise ParamsError naming every problem."""
    if kind not in FILE_PARAMS:
        raise ParamsError(f"unknown parameter file kind {kind!r}; known: {', '.join(FILE_PARAMS)}")
    values = values or {}
    if not isinstance(values, dict):
        raise ParamsError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
    try:
        return TypeAdapter(FILE_PARAMS[kind]).validate_python(values)
    except ValidationError as e:
        raise ParamsError("\n".join(_format_errors(source, e))) from None


def read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None


def load_preset(path: Path | str) -> Preset:
    """Read and validate every parameter file of a preset folder, reporting all problems at once."""
    path = Path(path)
    if not path.is_dir():
        raise ParamsError(f"preset folder {str(path)!r} does not exist; presets live in params/<name>/")
    files, problems = {}, []
    for kind, filename in PRESET_FILES.items():
        file = path / filename
        if not file.is_file() and kind in OPTIONAL_FILES:
            files[kind] = validate(kind, {"run": False}, str(file))
            continue
        if not file.is_file():
            problems.append(f"{file}: missing (a preset needs {', '.join(PRESET_FILES[k] for k in PRESET_FILES if k not in OPTIONAL_FILES)})")
            continue
        try:
            files[kind] = validate(kind, read_yaml(file), str(file))
        except ParamsError as e:
            problems.append(str(e))
    if problems:
        raise ParamsError("\n".join(problems))
    try:
        return Preset(name=path.name, path=str(path), **files)
    except ValidationError as e:   # a rule across files: its message names the files and keys
        raise ParamsError("\n".join(f"{path}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors())) from None
