"""How long stages take: measured where the store has run them, modelled where it has not.

Every stage has a *cost class* (its kind, and for a search its algorithm, for a poison its
attack, for a defence its name) and a number of *work units* computed from its spec: the
images it pushes through a network times the epochs, times the network's size. The network
size is a convolution cost proxy, ``channels² x cells x pixels / 10⁶``; kinds whose work does
not follow a network (the cheap attacks, the random sample, TE-NAS, the gallery and report)
count one unit per stage or per artifact read. A class's *seconds per unit* is then

* **measured**: total seconds over total units of the stages of that class the store holds
  (``spec.json`` records each stage's seconds: its execution's wall time shared out between
  the trials it ran, so notebook overhead is included) and of those finished during the run;
* **modelled** otherwise: :data:`MODELLED_SECONDS_PER_UNIT`, fitted on this project's
  machine, scaled by how fast this machine was on the classes it has measured.

A stage that is in the store is estimated by its own recorded seconds. The units are a proxy:
they scale a measured class to other sizes of the same algorithm, and are exact only in the
proportions they model (more images or epochs: proportionally more time; larger networks:
more time, though small networks cost more per unit than the proxy says).

Fitting the modelled coefficients from a finished run: ``python -m nbutils.pipeline.cost_model
outputs/`` prints the table in the form of :data:`MODELLED_SECONDS_PER_UNIT`.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..nas import registry
from ..nas.search_cost import network_units

#: native image side of each dataset (the size when the preset gives none)
NATIVE_SIDE = {"cifar10": 32, "cifar100": 32, "mnist": 28, "fashion_mnist": 28, "svhn": 32, "digits": 8, "noise": 28}

#: images per split, for sizes left to "all" (None) in a preset
SPLIT_IMAGES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "mnist": (60000, 10000),
                "fashion_mnist": (60000, 10000), "svhn": (73257, 26032), "digits": (1437, 360), "noise": (2000, 500)}

#: seconds per work unit of each cost class when the store has measured none of it, on the
#: project's 2-core machine (two workers of one thread each, warm kernels): the quick preset's
#: classes (DARTS search, retraining on the fast network, RLF, random sampling, gallery, report)
#: fitted on its run of 2026-12-06 (a fresh clone at a3b511b, the fast supernet's convolutions of
#: one state fused; benchmarks/README.md); the others fitted on a run of the tour preset under
#: heavy load from other jobs and scaled by the ratio the DARTS search showed between the two runs
#: (0.275). A run rescales them by the speed it measures. ``defend relabel`` and ``defend
#: denoise``, which no CPU preset runs, take ``defend sanitise``'s value. P-DARTS' search value
#: follows DARTS' by the ratio of their fits before the fused convolutions (0.058 / 0.088; scaled,
#: not measured). Refit with ``python -m nbutils.pipeline.cost_model OUTPUTS``.
MODELLED_SECONDS_PER_UNIT: dict[str, float] = {
    "search darts": 0.05805,
    "search pdarts": 0.0383,  # DARTS' value times 0.058 / 0.088 (see above)
    "search tenas": 41.98,
    "search robot": 0.031,
    "search nsganetv2": 0.01535,
    "search random": 0.6321,
    "retrain": 0.00945,
    "surrogate": 0.0404,
    "poison rlf": 0.682,
    "poison clf": 1.536,
    "poison gaussian": 0.4099,
    "poison gc": 0.0659,
    "poison alpha": 0.0881,
    "defend sanitise": 0.0407,
    "defend relabel": 0.0407,
    "defend denoise": 0.0407,
    "sensitivity": 0.4435,
    "sensitivity tenas": 1.3,   # per architecture, CIFAR-sized images, TE-NAS's settings (one thread)
    "gallery": 0.07053,
    "report": 0.148,
}


def _side(data: dict, search: bool) -> int:
    side = data.get("search_image_size" if search else "image_size")
    return int(side or NATIVE_SIDE.get(data.get("dataset"), 32))


def _images(data: dict, name: str) -> int:
    """``search_size``, ``train_size`` or ``test_size``, all of the split when None."""
    value = data.get(name)
    if value is not None:
        return int(value)
    train, test = SPLIT_IMAGES.get(data.get("dataset"), (50000, 10000))
    return test if name == "test_size" else train


def cost_class(kind: str, spec: dict) -> str:
    if kind == "search":
        algorithm = spec.get("algorithm", "?")   # a search shares its section's class (anti-search: DARTS')
        return "search " + (registry.ALGORITHMS[algorithm].section if algorithm in registry.ALGORITHMS else algorithm)
    if kind == "poison":
        return "poison " + spec.get("attack", {}).get("name", "?")
    if kind == "defend":
        return "defend " + spec.get("defense", {}).get("name", "?")
    if kind == "sensitivity" and "tenas" in spec.get("config", {}):
        return "sensitivity tenas"
    return kind


def work_units(kind: str, spec: dict, reads: int = 0) -> float:
    """The work of a stage of ``kind`` with ``spec`` reading ``reads`` artifacts, in the units
    of its cost class (see the module docstring)."""
    data = spec.get("data", {})
    config = spec.get("config", {})
    if kind == "search":
        algorithm = registry.ALGORITHMS.get(spec.get("algorithm"))
        if algorithm is None or algorithm.work_units is None:
            return 1.0   # random sampling, and TE-NAS (its pruning rounds do not follow a network's size)
        return algorithm.work_units(config, _images(data, "search_size"), _side(data, search=True))
    if kind == "retrain":
        net = network_units(config["channels"], config["layers"], _side(data, search=False))
        return (_images(data, "train_size") * config["epochs"] + _images(data, "test_size") / 3) * net
    if kind == "surrogate":   # a fixed ResNet-18
        return _images(data, "search_size") * config["epochs"] * _side(data, search=True) ** 2 / 1e3
    if kind == "poison":
        attack = spec.get("attack", {})
        pixels = _side(data, search=True) ** 2 / 1e3
        if attack.get("name") == "gc":
            return attack["steps"] * attack["batch_size"] * pixels
        if attack.get("name") == "alpha":
            return attack["steps"] * attack["batch_size"] * spec.get("ensemble", 1) * pixels
        return 1.0   # label flips and noise: no optimisation
    if kind == "defend":
        defense = spec.get("defense", {})
        images, pixels = _images(data, "search_size"), _side(data, search=True) ** 2 / 1e3
        # the defaults of nbutils.defenses.defending.DefenseConfig where the preset leaves them out
        if defense.get("name") == "sanitise":
            return defense.get("surrogate_epochs", 40) * images * pixels
        if defense.get("name") == "denoise":
            if defense.get("ddpm_path"):   # a trained DDPM: only the denoising pass
                return images * pixels
            return defense.get("ddpm_epochs", 50) * defense.get("ddpm_trusted_size", 1000) * pixels
        return images * pixels
    if kind == "sensitivity" and "tenas" in config:   # TE-NAS's C=1 networks: per architecture (the supernet: 7 operations per edge)
        return config["architectures"] * (7 if config.get("tenas_network") == "supernet" else 1)
    if kind == "sensitivity":
        return config["architectures"] * config["samples"] * network_units(config["channels"], config["layers"],
                                                                       _side(data, search=True))
    return 1.0 + reads   # gallery, report: one unit per artifact they show


@dataclass
class Estimate:
    seconds: float
    basis: str   # "recorded" (this stage's own seconds), "measured" (its class's), "modelled"


class CostModel:
    """Seconds per unit of each cost class, from what was measured and the modelled table."""

    def __init__(self, modelled: dict[str, float] | None = None):
        self.modelled = dict(MODELLED_SECONDS_PER_UNIT if modelled is None else modelled)
        self._seconds: dict[str, float] = {}
        self._units: dict[str, float] = {}

    def observe(self, kind: str, spec: dict, seconds: float, reads: int = 0) -> None:
        """A stage of this kind and spec took ``seconds``."""
        name = cost_class(kind, spec)
        self._seconds[name] = self._seconds.get(name, 0.0) + float(seconds)
        self._units[name] = self._units.get(name, 0.0) + work_units(kind, spec, reads)

    def measured(self, name: str) -> float | None:
        units = self._units.get(name, 0.0)
        return self._seconds[name] / units if units > 0 else None

    def speed_factor(self) -> float:
        """How much slower (> 1) this machine ran the measured classes than the modelled table
        says, weighted by their seconds; 1 when nothing comparable was measured."""
        predicted = sum(self.modelled[name] * units for name, units in self._units.items()
                        if name in self.modelled and units > 0)
        actual = sum(self._seconds[name] for name, units in self._units.items() if name in self.modelled and units > 0)
        return actual / predicted if predicted > 0 and actual > 0 else 1.0

    def estimate(self, kind: str, spec: dict, reads: int = 0) -> Estimate:
        name = cost_class(kind, spec)
        units = work_units(kind, spec, reads)
        rate = self.measured(name)
        if rate is not None:
            return Estimate(rate * units, "measured")
        rate = self.modelled.get(name, max(self.modelled.values(), default=1.0))
        return Estimate(rate * units * self.speed_factor(), "modelled")

    @classmethod
    def from_store(cls, outputs: str | Path, modelled: dict[str, float] | None = None) -> "CostModel":
        """Measured from every committed stage under ``outputs`` (``<kind>/<key>/spec.json``)."""
        model = cls(modelled)
        for record in stage_records(outputs):
            model.observe(record["kind"], record["spec"], record["seconds"], len(record.get("inputs", {})))
        return model


def stage_records(outputs: str | Path) -> Iterable[dict]:
    """The records (``spec.json``) of the stages committed under ``outputs``, with seconds."""
    for path in sorted(Path(outputs).glob("*/*/spec.json")):
        if path.parent.name.startswith(".") or path.parent.name.endswith(".failed"):
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record.get("seconds"), (int, float)) and "spec" in record and "kind" in record:
            yield record


def recorded_seconds(outputs: str | Path, kind: str, key: str) -> float | None:
    """The seconds recorded for one stage of the store, if it holds it."""
    path = Path(outputs) / kind / key / "spec.json"
    try:
        value = json.loads(path.read_text()).get("seconds")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def format_duration(seconds: float) -> str:
    """``45 s``, ``4 min 10 s``, ``23 min``, ``2 h 05 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{math.ceil(seconds)} s"
    if seconds < 600:
        minutes, rest = divmod(int(round(seconds)), 60)
        return f"{minutes} min {rest:02d} s"
    if seconds < 3600:
        return f"{int(round(seconds / 60))} min"
    hours, minutes = divmod(int(round(seconds / 60)), 60)
    return f"{hours} h {minutes:02d} min"


def fitted_table(outputs: str | Path) -> dict[str, float]:
    """Seconds per unit of every class measured under ``outputs``."""
    model = CostModel.from_store(outputs)
    return {name: model.measured(name) for name in sorted(model._units) if model.measured(name) is not None}


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs")
    table = fitted_table(folder)
    if not table:
        sys.exit(f"no stages with recorded seconds under {folder}")
    print("MODELLED_SECONDS_PER_UNIT: dict[str, float] = {")
    for name, rate in table.items():
        print(f'    "{name}": {rate:.4g},')
    print("}")
