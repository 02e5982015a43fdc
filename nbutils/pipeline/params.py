"""Parameter files: one YAML file per notebook per preset, under ``params/<preset>/``,
validated into typed specs before anything runs.

Unknown keys, wrong types and out-of-range values fail with the file, the key, the value
and what is allowed. YAML 1.1 reads ``1e-3`` as a string; numbers written that way are
accepted as numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.data import DATASETS, SPLIT_SIZES

DatasetName = Literal[DATASETS]  # type: ignore[valid-type]
Device = Literal["auto", "cpu", "cuda"]
Budget = Annotated[float, Field(gt=0, le=1, description="fraction of the search data, in (0, 1]")]
Pixels = Annotated[float, Field(ge=0, le=255, description="pixel units, 0..255")]
PositiveInt = Annotated[int, Field(ge=1)]

# darts_anti: the workshop paper's anti-search (DARTS maximising the loss), Table 1
NAS_ALGORITHMS = ("darts", "darts_anti", "pdarts", "tenas", "robot", "nsganetv2")
LABEL_FREE = ("tenas",)    # never read labels: label flipping cannot change what they find
ATTACK_NAMES = ("none", "rlf", "clf", "gaussian", "gc", "alpha")

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


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- grid.yaml: what runs ---------------------------------------------------------------------
class DataSpec(Spec):
    dataset: DatasetName = "fashion_mnist"
    data_root: Optional[str] = None
    download: bool = False
    subset_seed: Annotated[int, Field(ge=0)] = 0   # which images the subsets below take
    search_size: Optional[PositiveInt] = None   # training images the search sees (None: all)
    search_image_size: Optional[Annotated[int, Field(ge=8)]] = None
    train_size: Optional[PositiveInt] = None    # clean training images for retraining (None: all)
    test_size: Optional[PositiveInt] = None     # test images for the final accuracy (None: all)
    image_size: Optional[Annotated[int, Field(ge=8)]] = None

    @field_validator("data_root")
    @classmethod
    def _absolute_data_root(cls, root: Optional[str]) -> Optional[str]:
        """A relative ``data_root`` is taken from the working directory of the run and made
        absolute here, before it reaches a notebook (whose kernel runs in ``notebooks/``)."""
        return None if root in (None, "") else str(Path(root).expanduser().resolve())

    @model_validator(mode="after")
    def _sizes_fit_the_splits(self) -> "DataSpec":
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


class AttackEntry(Spec):
    name: Literal[ATTACK_NAMES]  # type: ignore[valid-type]
    budgets: list[Budget] = []
    ensemble: Optional[PositiveInt] = None   # alpha only: supernets in the ensemble (workshop: e=1 or 6)
    algorithms: Optional[list[Literal[NAS_ALGORITHMS]]] = None   # type: ignore[valid-type]  # default: every one

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


class OodEntry(Spec):
    """Search on another dataset, retrain on the grid's (TMLR Table 3)."""

    dataset: DatasetName    # the search data (noise: pure random images)
    search_size: Optional[PositiveInt] = None
    search_image_size: Optional[Annotated[int, Field(ge=8)]] = None
    algorithms: Optional[list[Literal[NAS_ALGORITHMS]]] = None   # type: ignore[valid-type]  # default: every one

    @model_validator(mode="after")
    def _size_fits_the_split(self) -> "OodEntry":
        check_sizes_fit(self.dataset, {"search_size": ("train", self.search_size)})
        return self


class DefenseEntry(Spec):
    """One defence applied to poisoned search data before the search (TMLR Table 4)."""

    name: Literal["sanitise", "relabel", "denoise"]
    attacks: Annotated[list[str], Field(min_length=1)]   # the conditions it defends (e.g. rlf, gc)
    algorithms: Optional[list[Literal[NAS_ALGORITHMS]]] = None   # type: ignore[valid-type]  # default: every one
    budgets: Optional[list[Budget]] = None   # default: every budget of those attacks (TMLR Table 4: 50% only)


class GridSpec(Spec):
    data: DataSpec = DataSpec()
    defenses: list[DefenseEntry] = []
    ood: list[OodEntry] = []                  # out-of-distribution searches, clean, per algorithm
    augmentation_ablation: list[Literal[NAS_ALGORITHMS]] = []  # type: ignore[valid-type]  # TMLR Table 6
    trials: PositiveInt = 2
    seed: Annotated[int, Field(ge=0)] = 0
    nas_algorithms: Annotated[list[Literal[NAS_ALGORITHMS]], Field(min_length=1)] = ["darts"]  # type: ignore[valid-type]
    attacks: Annotated[list[AttackEntry], Field(min_length=1)] = [AttackEntry(name="none")]
    random_samples: Annotated[int, Field(ge=0)] = 10

    @field_validator("attacks")
    @classmethod
    def _clean_condition_present(cls, attacks: list[AttackEntry]) -> list[AttackEntry]:
        if not any(a.name == "none" for a in attacks):
            raise ValueError("the attacks must include {name: none}: the clean condition every test compares against")
        seen = [a.condition for a in attacks]
        if len(seen) != len(set(seen)):
            raise ValueError(f"each attack may appear once (put all its budgets in one list), got {seen}")
        return attacks

    @model_validator(mode="after")
    def _attacked_algorithms_searched(self) -> "GridSpec":
        for a in self.attacks:
            extra = sorted(set(a.algorithms or ()) - set(self.nas_algorithms))
            if extra:
                raise ValueError(f"attack {a.condition!r} names algorithms {extra} that nas_algorithms does not search")
        return self

    @model_validator(mode="after")
    def _ablation_searched(self) -> "GridSpec":
        extra = sorted(set(self.augmentation_ablation) - set(self.nas_algorithms))
        if extra:
            raise ValueError(f"augmentation_ablation names algorithms {extra} that nas_algorithms does not search")
        if self.augmentation_ablation and not any(a.name == "gc" for a in self.attacks):
            raise ValueError("augmentation_ablation repeats gradient canceling without search augmentation: "
                             "the attacks must include gc")
        return self

    @model_validator(mode="after")
    def _defended_attacks_exist(self) -> "GridSpec":
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
    def _label_attacks_need_labels(self) -> "GridSpec":
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
    def _attack_targets_exist(self) -> "GridSpec":
        if any(a.name == "alpha" for a in self.attacks) and "darts" not in self.nas_algorithms:
            raise ValueError("the alpha attack crafts its poisons on clean DARTS supernets: "
                             "nas_algorithms must include darts")
        return self


# --- craft_poisons.yaml ------------------------------------------------------------------------
class SurrogateSpec(Spec):
    """CLF's surrogate ResNet-18, trained once per dataset and seed on the clean search data."""

    epochs: PositiveInt = 40
    batch_size: PositiveInt = 128
    lr: Annotated[float, Field(gt=0)] = 0.1


class GradientCancelingSpec(Spec):
    steps: PositiveInt = 250
    lr: Optional[Annotated[float, Field(gt=0)]] = None    # null: the recipe's default
    batch_size: PositiveInt = 128
    gradpc_epsilon: Annotated[float, Field(ge=0)] = 1.0   # L2 radius of the target's corruption
    gradpc_steps: Optional[PositiveInt] = None            # null: one pass over the data
    gradpc_step_size: Annotated[float, Field(gt=0)] = 1.0


class AlphaAttackSpec(Spec):
    steps: PositiveInt = 250
    lr: Optional[Annotated[float, Field(gt=0)]] = None    # null: Witches' Brew's rule
    batch_size: PositiveInt = 128
    cells: Literal["normal", "both"] = "normal"   # the cells Eq. 2 sums over
    augment: bool = True                          # differentiable translation and flip


class CraftPoisonsSpec(Spec):
    seed: Annotated[int, Field(ge=0)] = 0   # which samples are poisoned, and the noise drawn
    eps: Pixels = 16.0                      # l_inf bound of clean-label perturbations
    sigma: Annotated[float, Field(ge=0)] = 16.0   # Gaussian noise standard deviation, pixel units
    device: Device = "auto"
    surrogate: SurrogateSpec = SurrogateSpec()
    gc: GradientCancelingSpec = GradientCancelingSpec()
    alpha: AlphaAttackSpec = AlphaAttackSpec()

    def attack_spec(self, name: str, budget: float) -> dict:
        """The ``nbutils.attacks.poisoning.AttackSpec`` fields of one attack at one budget."""
        spec = {"name": name, "budget": budget, "seed": self.seed, "eps": self.eps, "sigma": self.sigma}
        if name == "gc":
            spec.update(self.gc.model_dump())
        elif name == "alpha":
            spec.update(self.alpha.model_dump())
        return spec


# --- search.yaml -------------------------------------------------------------------------------
class DartsSpec(Spec):
    epochs: PositiveInt = 50
    channels: Annotated[int, Field(ge=2, multiple_of=2)] = 16
    layers: Annotated[int, Field(ge=3)] = 8
    batch_size: PositiveInt = 64
    lr: Annotated[float, Field(gt=0)] = 0.025
    lr_min: Annotated[float, Field(ge=0)] = 0.001
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 3e-4
    grad_clip: Annotated[float, Field(gt=0)] = 5.0
    arch_lr: Annotated[float, Field(gt=0)] = 3e-4
    arch_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.5, 0.999)
    arch_weight_decay: Annotated[float, Field(ge=0)] = 1e-3
    order: Literal[1, 2] = 1   # architecture gradient: 1 first order, 2 second order (unrolled)


class PdartsSpec(Spec):
    """P-DARTS; the defaults are the reference's (three stages of 25 epochs, 10 of them warm-up)."""

    layers: Annotated[list[Annotated[int, Field(ge=3)]], Field(min_length=1)] = [5, 11, 17]   # cells per stage
    num_to_keep: Annotated[list[PositiveInt], Field(min_length=1)] = [5, 3, 1]   # operations per edge after each stage
    dropout_rates: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=1)] = [0.1, 0.4, 0.7]
    epochs: PositiveInt = 25            # per stage
    warmup_epochs: Annotated[int, Field(ge=0)] = 10   # per stage, weights only
    channels: Annotated[int, Field(ge=2, multiple_of=2)] = 16
    batch_size: PositiveInt = 96
    lr: Annotated[float, Field(gt=0)] = 0.025
    lr_min: Annotated[float, Field(ge=0)] = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 3e-4
    grad_clip: Annotated[float, Field(gt=0)] = 5.0
    arch_lr: Annotated[float, Field(gt=0)] = 6e-4
    arch_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.5, 0.999)
    arch_weight_decay: Annotated[float, Field(ge=0)] = 1e-3
    max_skip: Optional[Annotated[int, Field(ge=0)]] = 2   # skip connections in the final normal cell; null: no limit
    order: Literal[1, 2] = 1

    @model_validator(mode="after")
    def _stages_agree(self) -> "PdartsSpec":
        n = len(self.layers)
        if len(self.num_to_keep) != n or len(self.dropout_rates) != n:
            raise ValueError(f"layers, num_to_keep and dropout_rates need one entry per stage; got {n}, "
                             f"{len(self.num_to_keep)} and {len(self.dropout_rates)}")
        keep = [8, *self.num_to_keep]
        if any(b >= a for a, b in zip(keep, keep[1:])) or self.num_to_keep[-1] != 1:
            raise ValueError(f"num_to_keep must decrease from 8 operations to 1, got {self.num_to_keep}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) cannot exceed epochs ({self.epochs})")
        return self


class TenasSpec(Spec):
    """TE-NAS; the defaults are the reference's (NTK batch 14, C=1, 2 cells, 3 repeats)."""

    batch_size: Annotated[int, Field(ge=2)] = 14
    channels: PositiveInt = 1
    cells: Annotated[int, Field(ge=2)] = 2
    repeats: PositiveInt = 3
    region_batches: PositiveInt = 3
    region_batch_size: Annotated[int, Field(ge=2)] = 1000
    prune_per_round: PositiveInt = 3
    fresh_batches: bool = True   # false: the candidates of a round share their batches (about half the work)
    image_size: Annotated[int, Field(ge=8)] | None = None   # resize the search images for TE-NAS (null: as they are)


class RobotSpec(Spec):
    """RoBoT; the defaults are the reference's (pool of 60k, 1 + 24 BO queries, budget 25)."""

    pool_size: PositiveInt = 60000          # random architectures scored by the six metrics
    init_points: PositiveInt = 1            # random BO queries before the GP proposes
    iterations: Annotated[int, Field(ge=0)] = 24   # BO proposals (UCB)
    budget: PositiveInt = 25                # distinct architectures trained (BO + exploitation)
    train_epochs: PositiveInt = 10          # brief training of each queried architecture
    train_batch_size: PositiveInt = 576
    lr: Annotated[float, Field(gt=0)] = 0.1
    lr_min: Annotated[float, Field(ge=0)] = 5e-3
    channels: Annotated[int, Field(ge=2, multiple_of=2)] = 16
    layers: Annotated[int, Field(ge=3)] = 5
    metric_batch_size: Annotated[int, Field(ge=2)] = 64

    @model_validator(mode="after")
    def _budget_fits(self) -> "RobotSpec":
        if not self.init_points + self.iterations <= self.budget <= self.pool_size:
            raise ValueError(f"need init_points + iterations <= budget <= pool_size, got {self.init_points} + "
                             f"{self.iterations}, {self.budget}, {self.pool_size}")
        return self


class Nsganetv2Spec(Spec):
    """NSGANetV2 on the DARTS space with a weight-sharing supernet trained on the search data;
    the defaults are the reference's (100 initial architectures, 30 iterations of 8)."""

    initial_design: Annotated[int, Field(ge=6)] = 100   # the adaptive predictor cross-validates: >= 6
    iterations: Annotated[int, Field(ge=0)] = 30
    candidates_per_iteration: PositiveInt = 8
    predictor: Literal["adaptive", "rbf", "gp", "cart"] = "adaptive"
    population: Annotated[int, Field(ge=2)] = 40     # NSGA-II on the predictor
    generations: PositiveInt = 20
    cost: Literal["params", "macs"] = "params"       # the second objective, of the retrained network
    cost_channels: Annotated[int, Field(ge=2, multiple_of=2)] = 36
    cost_layers: Annotated[int, Field(ge=3)] = 20
    channels: Annotated[int, Field(ge=2, multiple_of=2)] = 16   # the supernet
    layers: Annotated[int, Field(ge=3)] = 8
    epochs: Annotated[int, Field(ge=0)] = 50
    batch_size: Annotated[int, Field(ge=2)] = 64
    lr: Annotated[float, Field(gt=0)] = 0.025
    calibration_batches: PositiveInt = 10


class SearchSpec(Spec):
    device: Device = "auto"
    augment: bool = True     # random crop and flip during the search (TMLR Table 6 turns it off)
    fast: bool = True        # the fast supernet; false: the plain one (the executable specification)
    mixed_precision: bool = False   # DARTS and P-DARTS on CUDA: float16 autocast with gradient scaling (order 1)
    darts: DartsSpec = DartsSpec()
    pdarts: PdartsSpec = PdartsSpec()
    tenas: TenasSpec = TenasSpec()
    robot: RobotSpec = RobotSpec()
    nsganetv2: Nsganetv2Spec = Nsganetv2Spec()

    @model_validator(mode="after")
    def _mixed_precision_first_order(self) -> "SearchSpec":
        if self.mixed_precision:
            second = [name for name in ("darts", "pdarts") if getattr(self, name).order == 2]
            if second:
                raise ValueError(f"mixed_precision supports the first-order search only: set order: 1 in "
                                 f"{' and '.join(second)}, or mixed_precision: false")
        return self

    def config_of(self, algorithm: str) -> dict:
        """The settings a search stage of ``algorithm`` runs with (``darts_anti`` shares DARTS')."""
        family = {"darts_anti": "darts"}.get(algorithm, algorithm)
        if family == "random":
            return {}
        return getattr(self, family).model_dump()


# --- retrain.yaml ------------------------------------------------------------------------------
class RetrainSpec(Spec):
    device: Device = "auto"
    epochs: PositiveInt = 600
    channels: Annotated[int, Field(ge=2, multiple_of=2)] = 36
    layers: Annotated[int, Field(ge=3)] = 20
    batch_size: PositiveInt = 128
    lr: Annotated[float, Field(gt=0)] = 0.025
    lr_min: Annotated[float, Field(ge=0)] = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 3e-4
    grad_clip: Annotated[float, Field(gt=0)] = 5.0
    auxiliary: bool = True
    auxiliary_weight: Annotated[float, Field(ge=0)] = 0.4
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.3
    cutout: Annotated[int, Field(ge=0)] = 16
    augment: bool = True
    mixed_precision: bool = False   # CUDA only: float16 autocast with gradient scaling
    channels_last: bool = False     # NHWC activations (faster on recent GPUs)


# --- metric_sensitivity.yaml (TMLR Table 2) -----------------------------------------------------
class MetricSensitivitySpec(Spec):
    """Each training-free metric on clean and on poisoned data, same random architectures."""

    run: bool = True
    architectures: PositiveInt = 100    # random architectures (paper: 100)
    samples: Annotated[int, Field(ge=2)] = 1000   # search images the metrics see (paper: 1000)
    batch_size: Annotated[int, Field(ge=2)] = 64
    channels: Annotated[int, Field(ge=2, multiple_of=2)] = 16
    layers: Annotated[int, Field(ge=3)] = 5
    seed: Annotated[int, Field(ge=0)] = 0
    device: Device = "auto"


# --- defend.yaml (TMLR Table 4) -----------------------------------------------------------------
#: defence settings that name a local file or folder
LOCAL_FILES = ("ddpm_path", "extractor_weights")


class DefendSpec(Spec):
    """Settings of each defence (``nbutils.defenses.defending.DefenseSpec`` fields); grid.yaml says which run."""

    run: bool = True
    seed: Annotated[int, Field(ge=0)] = 0
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
    def _settings_valid(self) -> "DefendSpec":
        from ..defenses.defending import DefenseSpec

        for name in ("sanitise", "relabel", "denoise"):
            try:
                DefenseSpec(name=name, seed=self.seed, **getattr(self, name))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}: {e}") from None
        return self

    def defense_spec(self, name: str) -> dict:
        return {"name": name, "seed": self.seed, **getattr(self, name)}


# --- report.yaml -------------------------------------------------------------------------------
class ReportSpec(Spec):
    title: str = "Does neural architecture search survive poisoned data?"
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05   # significance level (BH false discovery rate)


FILE_SPECS: dict[str, type[Spec]] = {
    "grid": GridSpec,
    "craft_poisons": CraftPoisonsSpec,
    "search": SearchSpec,
    "retrain": RetrainSpec,
    "metric_sensitivity": MetricSensitivitySpec,
    "defend": DefendSpec,
    "report": ReportSpec,
}


class Preset(Spec):
    name: str
    path: str
    grid: GridSpec
    craft_poisons: CraftPoisonsSpec
    search: SearchSpec
    retrain: RetrainSpec
    metric_sensitivity: MetricSensitivitySpec
    defend: DefendSpec
    report: ReportSpec

    @model_validator(mode="after")
    def _defenses_configured(self) -> "Preset":
        if self.grid.defenses and not self.defend.run:
            raise ValueError("grid.yaml lists defenses but the preset has no defend.yaml (or it says run: false)")
        return self


def _format_errors(source: str, error: ValidationError) -> list[str]:
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {where!r} (value {value!r})")
        else:
            lines.append(f"{source}: {where} = {value!r}: {e['msg']}")
    return lines


def validate(kind: str, values: dict | None, source: str = "<dict>") -> Spec:
    """Validate one file's values into its spec; raise ParamsError naming every problem."""
    if kind not in FILE_SPECS:
        raise ParamsError(f"unknown parameter file kind {kind!r}; known: {', '.join(FILE_SPECS)}")
    values = values or {}
    if not isinstance(values, dict):
        raise ParamsError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
    try:
        return FILE_SPECS[kind].model_validate(values)
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
    specs, problems = {}, []
    for kind, filename in PRESET_FILES.items():
        file = path / filename
        if not file.is_file() and kind in OPTIONAL_FILES:
            specs[kind] = validate(kind, {"run": False}, str(file))
            continue
        if not file.is_file():
            problems.append(f"{file}: missing (a preset needs {', '.join(PRESET_FILES[k] for k in PRESET_FILES if k not in OPTIONAL_FILES)})")
            continue
        try:
            specs[kind] = validate(kind, read_yaml(file), str(file))
        except ParamsError as e:
            problems.append(str(e))
    if problems:
        raise ParamsError("\n".join(problems))
    return Preset(name=path.name, path=str(path), **specs)
