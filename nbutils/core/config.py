"""Configurations: the settings one procedure runs with (a search, a retraining), declared once
and checked where they are declared.

The package's words for settings:

* a **config** (``*Config``, made with :func:`config`) is what an engine function runs with, for
  instance :class:`nbutils.nas.darts.DartsConfig`. Each field carries its type, its range and its
  default (the paper's); a check that involves several fields is a validator of the last of
  them, so that its error names the field it is about;
* **params** (``*Params``, :mod:`nbutils.pipeline.params`) are the validated contents of a
  parameter file; their sections *are* the engines' configs, so a value written in YAML passes
  the same check as a value given in code;
* a **spec** is a stage's plain-JSON parameters (:class:`nbutils.pipeline.stages.Stage`): what
  its key hashes and what papermill hands its notebook. Its ``config`` entry holds a config's
  fields, and the step rebuilds the config from them.

A config is a frozen pydantic dataclass (so ``dataclasses.replace`` makes a changed copy, which is
checked again): unknown fields are refused, defaults are checked too (a validator may read the
fields declared before its own), NaN and infinities are refused, and so are ``true``/``false``
where a number is expected. Built in code, a bad value raises :class:`ConfigError` naming
``Class.field``, the value and the rule; inside a parameter file's model, the same rule fails
with the file and the key path.

Every field of a config a stage runs with (a search section, the retraining) also says how it
enters the stage's key, with :func:`keyed`, :func:`keyed_when_changed` or :func:`set_by_run` as
its default: the spec carries the config's settings (:func:`key_settings`) and the key hashes
the spec, so a field without that decision could change the key of every artifact made before
it existed (``tests/test_config_keys.py`` refuses one).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

T = TypeVar("T", bound=type)


class ConfigError(ValueError):
    """A config built in code with values its rules refuse; the message names each one."""


#: how every config validates (see the module docstring)
CONFIG_RULES = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def config(cls: T) -> T:
    """Make ``cls`` a config: a frozen pydantic dataclass with :data:`CONFIG_RULES`, whose
    constructor raises :class:`ConfigError` with one line per refused value."""
    cls = pydantic_dataclass(frozen=True, config=CONFIG_RULES)(cls)
    validating_init = cls.__init__

    @functools.wraps(validating_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            validating_init(self, *args, **kwargs)
        except ValidationError as error:
            raise ConfigError(describe(cls.__name__, error)) from None

    # nested in a parameter model, pydantic validates the fields without calling __init__, so
    # errors there keep their key paths; only direct construction goes through this wrapper
    cls.__init__ = __init__
    return cls


def describe(name: str, error: ValidationError) -> str:
    """One line per problem: ``Name.field = value: rule`` (``Name: rule`` for the whole)."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"])
        rule = problem["msg"].removeprefix("Value error, ")
        if problem["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            rule = "unknown field"
        lines.append(f"{name}.{field} = {problem['input']!r}: {rule}" if field else f"{name}: {rule}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- key membership

#: how a field of a config enters a stage's key: ``keyed`` always (the spec carries it);
#: ``keyed_when_changed`` only when it differs from its default (a setting the config gained after
#: artifacts had been made: those keep their keys); ``set_by_run`` never from the file (the run sets
#: it for each stage, e.g. search.yaml's ``augment``, so a section may not)
KeyRole = Literal["keyed", "keyed_when_changed", "set_by_run"]
KEY_ROLES: tuple[KeyRole, ...] = ("keyed", "keyed_when_changed", "set_by_run")


def _with_role(role: KeyRole, default: Any) -> Any:
    return dataclasses.field(default=default, metadata={"key": role})


def keyed(default: Any) -> Any:
    """The default of a field a stage's key always holds."""
    return _with_role("keyed", default)


def keyed_when_changed(default: Any) -> Any:
    """The default of a field a stage's key holds only when it differs from ``default``."""
    return _with_role("keyed_when_changed", default)


def set_by_run(default: Any) -> Any:
    """The default of a field the run sets for each stage (never a parameter file's section)."""
    return _with_role("set_by_run", default)


def key_role(field: dataclasses.Field) -> KeyRole | None:
    """The key decision of a config's field (None: it has none)."""
    return field.metadata.get("key")


def fields_with_role(config_class: type, role: KeyRole) -> tuple[str, ...]:
    """The names of ``config_class``'s fields whose key decision is ``role``, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(config_class) if key_role(f) == role)


def key_settings(config: Any) -> dict:
    """The settings of ``config`` that a stage's spec carries (and its key hashes): every field
    but those set by the run, and each ``keyed_when_changed`` field only when changed."""
    cls = type(config)
    defaults = cls()
    when_changed = fields_with_role(cls, "keyed_when_changed")
    run = fields_with_role(cls, "set_by_run")
    return {name: value for name, value in TypeAdapter(cls).dump_python(config).items()
            if name not in run and not (name in when_changed and value == getattr(defaults, name))}


# --------------------------------------------------------------------------- field types


def _not_a_boolean(value: Any) -> Any:
    """Python's True is 1: refuse it where a number is meant (``epochs: yes`` is a mistake)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


NOT_BOOLEAN = BeforeValidator(_not_a_boolean)


def integer(minimum: int, **constraints: Any) -> Any:
    """The type of an int >= ``minimum`` (and pydantic's further ``constraints``, e.g. ``multiple_of``)."""
    return Annotated[int, NOT_BOOLEAN, Field(ge=minimum, **constraints)]


def number(**bounds: float) -> Any:
    """The type of a finite number within pydantic's ``bounds`` (``gt``, ``ge``, ``lt``, ``le``)."""
    return Annotated[float, NOT_BOOLEAN, Field(**bounds)]


PositiveInt = integer(1)
NonNegativeInt = integer(0)
#: a random seed: stages derive theirs by adding a trial or sample number (at most
#: :data:`MAX_REPEATS`), and scikit-learn and NumPy's legacy generators take 32-bit seeds, so a
#: seed stays below 2**31 and every derived one below 2**32
MAX_SEED = 2**31 - 1
#: trials per condition, random architectures, ...: far beyond any study (the papers run 3-10),
#: low enough that a typo (``trials: 10000000``) is refused before the grid expands
MAX_REPEATS = 1000


def integer_within(minimum: int, maximum: int | None, why: str) -> Any:
    """The type of an int in ``minimum..maximum`` (no maximum: None) whose error says ``why``."""
    allowed = f"{minimum}..{maximum}" if maximum is not None else f"{minimum} or more"

    def check(value: int) -> int:
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"allowed: {allowed} ({why})")
        return value

    return Annotated[int, NOT_BOOLEAN, AfterValidator(check)]


Seed = integer_within(0, MAX_SEED, "stages add the trial number to a seed, and some libraries take 32-bit seeds")
Repeats = integer_within(1, MAX_REPEATS, "far beyond any study; the papers run 3 to 10")


def _each_once(values: list) -> list:
    """Refuse a list with a repeated entry, naming both positions: a repeated algorithm or
    attack would run no new stage but count its trials twice in the report's tests."""
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        shown = value.model_dump(exclude_defaults=True) if hasattr(value, "model_dump") else value
        key = repr(value.model_dump() if hasattr(value, "model_dump") else value)
        if key in seen:
            raise ValueError(f"entry {shown!r} is repeated at positions {seen[key]} and {i}; "
                             "each entry may appear once")
        seen[key] = i
    return values


#: a list whose entries must be distinct (:func:`_each_once`)
EachOnce = AfterValidator(_each_once)
#: channels of a DARTS-space network: the reduction cells' factorized reductions halve them
Channels = integer(2, multiple_of=2)
#: cells of a DARTS-space network: at least a normal cell and the two reduction cells
Cells = integer(3)
PositiveNumber = number(gt=0)
NonNegativeNumber = number(ge=0)
#: a probability that must leave something (dropout, drop path) or an SGD/Adam momentum
Rate = number(ge=0, lt=1)
#: the order of DARTS' architecture gradient: 1 first order, 2 second order (unrolled)
Order = Annotated[Literal[1, 2], NOT_BOOLEAN]
