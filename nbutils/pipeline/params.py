"""Parameter files: one YAML file per notebook per preset, under ``params/<preset>/``,
validated into typed params before anything runs.

This module reads a preset: every file at once (:func:`load_preset`), each into its params
(:func:`validate`), and the rules across files (:class:`Preset`); the files' params are declared
in :mod:`.grid_params` (grid.yaml: what runs) and :mod:`.stage_params` (how each kind of stage
runs), on :mod:`.params_base`'s model, and every name is read from here.

Words (:mod:`nbutils.core.config` says more): the *params* (``*Params``) are a
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
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError, model_validator

from ..core.datasets import SPLIT_SIZES
from ..defenses.defending import DefenseConfig
from .grid_params import (DATA_TAGS, LABEL_FREE, NAS_ALGORITHMS, AttackEntry, DataParams, DefenseEntry, GridParams,
                          OodEntry, check_sizes_fit)
from .params_base import Device, Params, ParamsError
from .stage_params import (KEYED_WHEN_CHANGED, SEARCH_CONFIGS, SET_BY_THE_RUN, AlphaAttackParams, CraftPoisonsParams,
                           DefendParams, GradientCancelingParams, MetricSensitivityParams, ReportParams, RetrainParams,
                           SearchParams, SearchRunParams, SurrogateParams)

#: the names other modules read from here (the parts live in :mod:`.params_base`,
#: :mod:`.grid_params` and :mod:`.stage_params`)
__all__ = [
    "AlphaAttackParams", "AttackEntry", "CraftPoisonsParams", "DataParams", "DefendParams", "DefenseEntry", "Device",
    "FILE_PARAMS", "GradientCancelingParams", "GridParams", "KEYED_WHEN_CHANGED", "LABEL_FREE", "MetricSensitivityParams",
    "NAS_ALGORITHMS", "OPTIONAL_FILES", "OodEntry", "PRESET_FILES", "Params", "ParamsError", "Preset", "ReportParams",
    "RetrainParams", "SEARCH_CONFIGS", "SET_BY_THE_RUN", "SearchParams", "SearchRunParams", "SurrogateParams",
    "check_sizes_fit", "load_preset", "read_yaml", "validate",
]

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
