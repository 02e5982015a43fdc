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

from .data import DATASETS

DatasetName = Literal[DATASETS]  # type: ignore[valid-type]
Device = Literal["auto", "cpu", "cuda"]
Budget = Annotated[float, Field(gt=0, le=1, description="fraction of the search data, in (0, 1]")]
Pixels = Annotated[float, Field(ge=0, le=255, description="pixel units, 0..255")]
PositiveInt = Annotated[int, Field(ge=1)]

NAS_ALGORITHMS = ("darts",)
ATTACK_NAMES = ("none", "rlf", "gaussian")

PRESET_FILES = {
    "grid": "grid.yaml",
    "craft_poisons": "craft_poisons.yaml",
    "search": "search.yaml",
    "retrain": "retrain.yaml",
    "report": "report.yaml",
}


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


class AttackEntry(Spec):
    name: Literal[ATTACK_NAMES]  # type: ignore[valid-type]
    budgets: list[Budget] = []

    @model_validator(mode="after")
    def _budgets_match_name(self) -> "AttackEntry":
        if self.name == "none" and self.budgets:
            raise ValueError("attack 'none' takes no budgets")
        if self.name != "none" and not self.budgets:
            raise ValueError(f"attack {self.name!r} needs at least one budget in (0, 1]")
        return self


class GridSpec(Spec):
    data: DataSpec = DataSpec()
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
        return attacks


# --- craft_poisons.yaml ------------------------------------------------------------------------
class CraftPoisonsSpec(Spec):
    seed: Annotated[int, Field(ge=0)] = 0   # which samples are poisoned, and the noise drawn
    eps: Pixels = 16.0                      # l_inf bound of clean-label perturbations
    sigma: Annotated[float, Field(ge=0)] = 16.0   # Gaussian noise standard deviation, pixel units


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


class SearchSpec(Spec):
    device: Device = "auto"
    augment: bool = True     # random crop and flip during the search
    darts: DartsSpec = DartsSpec()


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


# --- report.yaml -------------------------------------------------------------------------------
class ReportSpec(Spec):
    title: str = "Does neural architecture search survive poisoned data?"
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05   # significance level (BH false discovery rate)


FILE_SPECS: dict[str, type[Spec]] = {
    "grid": GridSpec,
    "craft_poisons": CraftPoisonsSpec,
    "search": SearchSpec,
    "retrain": RetrainSpec,
    "report": ReportSpec,
}


class Preset(Spec):
    name: str
    path: str
    grid: GridSpec
    craft_poisons: CraftPoisonsSpec
    search: SearchSpec
    retrain: RetrainSpec
    report: ReportSpec


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
        if not file.is_file():
            problems.append(f"{file}: missing (a preset needs {', '.join(PRESET_FILES.values())})")
            continue
        try:
            specs[kind] = validate(kind, read_yaml(file), str(file))
        except ParamsError as e:
            problems.append(str(e))
    if problems:
        raise ParamsError("\n".join(problems))
    return Preset(name=path.name, path=str(path), **specs)
