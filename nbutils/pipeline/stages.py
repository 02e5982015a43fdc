"""A preset as stages: :func:`expand` turns the validated parameter files into every stage of
the run, each after the stages it reads, with the key that names its artifact.

A *trial* is one path poison -> search -> retrain and ends in one accuracy. Stages:

    surrogate  00_surrogate.ipynb       CLF's surrogate ResNet-18, one per dataset and seed
    poison     01_craft_poisons.ipynb   one per (attack, budget); gradient canceling one per
                                        (algorithm, budget): it targets that algorithm's best
                                        clean run, the alpha attack the best clean DARTS run
    defend     02_defend.ipynb          one per (defence, poison set): the defended search data
    search     03_search.ipynb          one per (algorithm, condition, trial), plus random samples
    retrain    04_retrain.ipynb         one per search
    sensitivity 05_metric_sensitivity   the training-free metrics on clean vs poisoned data,
                                        one per poison set and measured algorithm (TMLR
                                        Table 2); gradient canceling: the poisons crafted
                                        against the algorithm whose metrics are measured
    gallery    06_genotype_gallery      one: every found cell, clean beside worst poisoned
    report     99_report.ipynb          one, reading every retrain artifact
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

from . import params
from ..core.config import key_settings
from ..core.datasets import search_augmentation
from ..attacks import registry as attack_registry
from ..nas import registry
from ..nas.darts import snapshot_epochs
from ..core.store import stage_key
from ..studies.tenas_indicators import TENAS_METRICS, TENAS_SETTINGS
from .code_versions import CODE_VERSIONS


#: the searches that ``search.mixed_precision`` applies to (the others train in float32)
MIXED_PRECISION_ALGORITHMS = registry.names(mixed_precision=True)


@dataclass(eq=False)
class Stage:
    """One stage of a run. ``spec``: its parameters in plain JSON, what its key hashes and what its
    notebook receives (an engine's settings under ``config``, which the step builds the config from)."""

    kind: str
    spec: dict
    label: str
    inputs: dict[str, "Stage"] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)   # what the report groups by; not part of the key
    batch: str | None = None   # stages of one kind with the same batch share an execution; not in the key
    rerun: bool = False        # run even if the artifact exists, and replace it (``--rerun``); not in the key

    def __post_init__(self) -> None:
        # plain JSON types only: what papermill passes to a notebook and what the key hashes
        self.spec = json.loads(json.dumps(self.spec))

    @cached_property
    def key(self) -> str:
        return stage_key(self.kind, self.spec, {role: s.key for role, s in self.inputs.items()},
                         code=CODE_VERSIONS[self.kind])


def _percent(budget: float) -> str:
    return f"{100 * budget:g}%"


#: the algorithms whose gradient-canceling target is the converged supernet's alpha (NAS-specific
#: GC, TMLR §3.2); every other algorithm's target is the weights of its best clean architecture
SUPERNET_ALGORITHMS = registry.names(supernet=True)


#: searched on clean data only: anti-search is the workshop paper's worst-case reference (Table 1)
CLEAN_ONLY = registry.names(clean_only=True)


def expand(preset: params.Preset) -> list[Stage]:
    """Every stage of the preset, each after the stages it reads.

    For each dataset of grid.yaml's ``data``: first every algorithm's clean trials (the crafted
    attacks read them: gradient canceling targets the best clean run of the algorithm it
    attacks, the alpha attack the best clean DARTS run's supernets), then the poisons and the
    poisoned trials, and random sampling (one search per sample, retrained on each dataset);
    on the primary dataset also the defences, the augmentation ablation and its clean
    reference, and the out-of-distribution searches. Last the gallery and the report, which
    read every trial.
    """
    grid = _GridBuilder(preset)
    for data in preset.grid.datasets:
        primary = grid.use(data)
        clean = {algorithm: grid.clean_trials(algorithm) for algorithm in preset.grid.nas_algorithms}
        for entry in preset.grid.attacks:
            for budget in entry.budgets:
                for algorithm in preset.grid.attacked(entry):
                    if algorithm not in CLEAN_ONLY:
                        grid.attacked_trials(entry, budget, algorithm, clean, primary)
        if primary:
            for algorithm in preset.grid.augmentation_ablation:
                grid.ablation_reference(algorithm)
            for ood in preset.grid.ood:
                grid.ood_trials(ood)
        grid.random_samples()
    return grid.stages + grid.summaries()


class _GridBuilder:
    """The stages of one preset as :func:`expand` adds them, one method per study; equal stages
    (same kind and key) are added once."""

    def __init__(self, preset: params.Preset):
        self.preset = preset
        self.data: dict = {}   # the dataset whose stages are being added (:meth:`use`)
        self.search_data: dict = {}   # the part of it that the stages before retraining read
        self.on = ""           # its name in stage labels, when the grid has several datasets
        self.stages: list[Stage] = []
        self.by_key: dict[tuple[str, str], Stage] = {}
        self.cells: list[Stage] = []   # retrain stages, for the report
        self.sensitivity: dict[tuple[str, float, str], Stage] = {}   # (condition, budget, measured algorithm)

    def use(self, data: params.DataParams) -> bool:
        """Add the next stages for ``data``; whether it is the primary dataset."""
        self.data = data.model_dump()
        self.search_data = before_retraining(self.data)
        self.on = f" on {data.dataset}" if len(self.preset.grid.datasets) > 1 else ""
        return data.dataset == self.preset.grid.primary.dataset

    def add(self, stage: Stage) -> Stage:
        key = (stage.kind, stage.key)
        if key not in self.by_key:
            self.by_key[key] = stage
            self.stages.append(stage)
        return self.by_key[key]

    # --- trials -------------------------------------------------------------------------------
    def trial(self, algorithm: str, entry: params.AttackEntry | None, budget: float | None, trial: int,
              poison: Stage | None, study: str = "main", search_data: dict | None = None,
              augment: bool | None = None) -> tuple[Stage, Stage]:
        """One search and its retraining. ``study``: main (the robustness table), ood (searched
        on ``search_data``, TMLR Table 3), no_augment (search without augmentation, Table 6)
        or defense:<name> (searched on defended data, Table 4)."""
        preset = self.preset
        seed = preset.grid.seed + trial
        search_data = search_data or self.search_data
        if augment is None:   # search.yaml's, for datasets the reference augments (not MNIST and SVHN)
            augment = preset.search.augment and search_augmentation(search_data["dataset"])
        spec = {"algorithm": algorithm, "data": search_data, "config": preset.search.config_of(algorithm),
                "augment": augment, "fast": preset.search.fast,
                "seed": seed, "device": preset.search.device}
        if preset.search.mixed_precision and algorithm in MIXED_PRECISION_ALGORITHMS:
            spec["mixed_precision"] = True   # only when on: the keys of float32 searches stay as they were
        if entry is None and study == "main":
            keep = supernets_to_keep(preset, algorithm)
            if keep is not None:
                spec["keep_supernets"] = keep
        condition = "clean" if entry is None else f"{entry.condition} {_percent(budget)}"
        meta = {"algorithm": algorithm, "attack": "none" if entry is None else entry.condition,
                "budget": budget, "trial": trial, "study": study, "dataset": self.data["dataset"]}
        if study == "ood":
            condition += f" searched on {search_data['dataset']}" + (f" (retrained on {self.data['dataset']})"
                                                                      if self.on else "")
            meta["search_dataset"] = search_data["dataset"]
        elif study == "no_augment":
            condition += " without search augmentation"
        elif study.startswith("defense:"):
            condition += f" defended by {study.removeprefix('defense:')}"
            meta["defense"] = study.removeprefix("defense:")
        if study != "ood":
            condition += self.on
        reads = {} if poison is None else {"defended" if poison.kind == "defend" else "poison": poison}
        search = self.add(Stage("search", spec, f"search {algorithm} {condition} trial {trial + 1}", reads, meta,
                                batch=f"{algorithm} {condition}"))
        return search, self.retrain_of(search, seed)

    def retrain_of(self, search: Stage, seed: int) -> Stage:
        config = {k: v for k, v in key_settings(self.preset.retrain).items() if k != "device"}
        spec = {"data": self.data, "config": config, "seed": seed,
                "device": self.preset.retrain.device}
        shared = search.meta["algorithm"] == "random"   # one random search, retrained on every dataset
        stage = self.add(Stage("retrain", spec, f"retrain <- {search.label}" + (self.on if shared else ""),
                               {"search": search}, {**search.meta, "dataset": self.data["dataset"]},
                               batch=search.batch + (self.on if shared else "")))
        self.cells.append(stage)
        return stage

    def trials(self, algorithm: str, entry: params.AttackEntry | None, budget: float | None, poison: Stage | None,
               **study) -> list[tuple[Stage, Stage]]:
        """:meth:`trial` for every trial of the grid, numbered from 0."""
        return [self.trial(algorithm, entry, budget, t, poison, **study) for t in range(self.preset.grid.trials)]

    # --- studies ------------------------------------------------------------------------------
    def clean_trials(self, algorithm: str) -> list[tuple[Stage, Stage]]:
        return self.trials(algorithm, None, None, None)

    def attacked_trials(self, entry: params.AttackEntry, budget: float, algorithm: str,
                        clean: dict[str, list[tuple[Stage, Stage]]], primary: bool = True) -> None:
        """The poison set of one attack at one budget against one algorithm and the poisoned
        trials; on the primary dataset also its metric sensitivity, defences and augmentation
        ablation."""
        grid = self.preset.grid
        poison = self.add(self.poison_stage(entry, budget, algorithm, clean))
        self.trials(algorithm, entry, budget, poison)
        if not primary:
            return
        self.sensitivity_studies(entry, budget, algorithm, poison)
        for defense in grid.defenses:
            if (entry.condition in defense.attacks
                    and (defense.algorithms is None or algorithm in defense.algorithms)
                    and (defense.budgets is None or budget in defense.budgets)):
                defended = self.add(defend_stage(self.preset, self.search_data, defense.name, poison))
                self.trials(algorithm, entry, budget, defended, study=f"defense:{defense.name}")
        if entry.name == "gc" and algorithm in grid.augmentation_ablation:
            self.trials(algorithm, entry, budget, poison, study="no_augment", augment=False)

    def poison_stage(self, entry: params.AttackEntry, budget: float, algorithm: str,
                     clean: dict[str, list[tuple[Stage, Stage]]]) -> Stage:
        """The poison set: CLF reads the surrogate, gradient canceling the attacked algorithm's
        clean trials, the alpha attack clean DARTS's."""
        craft = self.preset.craft_poisons
        target = ("alphas" if algorithm in SUPERNET_ALGORITHMS else "weights") if entry.name == "gc" else None
        spec = {"data": self.search_data, "attack": craft.attack_config(entry.name, budget, target), "device": craft.device}
        inputs: dict[str, Stage] = {}
        label = f"poison {entry.condition} {_percent(budget)}"
        meta = {"attack": entry.condition, "budget": budget, "dataset": self.data["dataset"]}
        attack = attack_registry.ATTACKS[entry.name]
        if (attack.crafted_on or target == "alphas") and not self.preset.search.fast:
            spec["fast"] = False   # crafted on the supernet the searches use (only when off: keys stay)
        if attack.needs_surrogate:
            inputs["surrogate"] = self.add(surrogate_stage(self.preset, self.search_data))
        elif attack.per_algorithm:
            spec["target"] = {"algorithm": algorithm, "kind": target}
            inputs = clean_inputs(clean[algorithm])
            label += f" against {algorithm}"
            meta["target"] = algorithm
        elif attack.crafted_on:
            spec["ensemble"] = entry.ensemble or 1
            inputs = clean_inputs(clean[attack.crafted_on])
        return Stage("poison", spec, label + self.on, inputs, meta)

    def sensitivity_studies(self, entry: params.AttackEntry, budget: float, algorithm: str, poison: Stage) -> None:
        """TMLR Table 2: the metric sensitivity to a poison set, one study per algorithm whose
        metrics it measures. Gradient canceling crafts its poisons against one algorithm, and
        each algorithm's metrics are measured on the poisons crafted against that algorithm (the
        reference: RoBoT's on GC against RoBoT, TE-NAS's on GC against TE-NAS); the other
        attacks' poisons are the same for every algorithm."""
        sensitivity = self.preset.metric_sensitivity
        if not sensitivity.run:
            return
        for measured in sensitivity.algorithms:
            if entry.name == "gc" and algorithm != measured:
                continue
            if (entry.condition, budget, measured) not in self.sensitivity:
                self.sensitivity[(entry.condition, budget, measured)] = self.add(
                    sensitivity_stage(self.preset, self.search_data, poison, measured))

    def sensitivity_not_run(self) -> list[dict]:
        """The Table 2 cells without a study, with the reason: an algorithm's metrics under
        gradient canceling when the grid crafts no gradient-canceling poisons against it."""
        grid, sensitivity = self.preset.grid, self.preset.metric_sensitivity
        entries = [e for e in grid.attacks if e.name == "gc"] if sensitivity.run else []
        missing = []
        for budget in dict.fromkeys(b for e in entries for b in e.budgets):
            attacked = [a for a in grid.nas_algorithms if any(budget in e.budgets and a in grid.attacked(e)
                                                              for e in entries)]
            for measured in sensitivity.algorithms:
                if ("gc", budget, measured) in self.sensitivity:
                    continue
                where = ("nas_algorithms does not search it" if measured not in grid.nas_algorithms
                         else f"attack gc's algorithms at {_percent(budget)} are {attacked}")
                name = registry.ALGORITHMS[measured].display_name
                missing.append({"attack": "gc", "budget": budget, "metrics_of": measured,
                                "reason": f"not run: the grid crafts no gradient-canceling poisons against "
                                          f"{name} ({where}), and {name}'s metrics are measured on the "
                                          f"poisons crafted against {name}"})
        return missing

    def ablation_reference(self, algorithm: str) -> None:
        """The clean searches without augmentation that the ablation's GC trials compare with."""
        self.trials(algorithm, None, None, None, study="no_augment", augment=False)

    def ood_trials(self, ood: params.OodEntry) -> None:
        """Searches on another dataset (with the search augmentation the reference gives that
        dataset, :meth:`trial`), retrained on the primary one."""
        search_data = before_retraining({**self.data, **ood.model_dump(exclude={"algorithms"})})
        for algorithm in ood.algorithms or self.preset.grid.nas_algorithms:
            self.trials(algorithm, None, None, None, study="ood", search_data=search_data)

    def random_samples(self) -> None:
        """The dImp baseline: random architectures, each retrained like a found one."""
        sampler = self.preset.search.random_sampler
        for sample in range(self.preset.grid.random_samples):
            seed = self.preset.grid.seed + sample
            meta = {"algorithm": "random", "attack": "none", "budget": None, "trial": sample}
            spec = {"algorithm": "random", "seed": seed, **({"sampler": sampler} if sampler != "distinct" else {})}
            search = self.add(Stage("search", spec, f"random sample {sample + 1}", meta=meta, batch="random"))
            self.retrain_of(search, seed)

    def summaries(self) -> list[Stage]:
        """The gallery and the report, reading every retrained trial (and the report every
        poison set and sensitivity study)."""
        preset, cells = self.preset, self.cells
        report_cells = [{**stage.meta, "role": f"retrain{i}"} for i, stage in enumerate(cells)]
        studies = [{**stage.meta, "role": f"sensitivity{i}"} for i, stage in enumerate(self.sensitivity.values())]
        poisons = [s for s in self.stages if s.kind == "poison"]
        shown = [{**stage.meta, "role": f"poison{i}"} for i, stage in enumerate(poisons)]
        not_run = self.sensitivity_not_run()
        report = Stage(
            "report",
            {"report": preset.report.model_dump(), "preset": preset.name, "cells": report_cells,
             "sensitivity": studies, "poisons": shown,
             **({"sensitivity_not_run": not_run} if not_run else {}),
             "settings": {k: getattr(preset, k).model_dump() for k in params.PRESET_FILES}},
            "report",
            {**{f"retrain{i}": stage for i, stage in enumerate(cells)},
             **{f"sensitivity{i}": stage for i, stage in enumerate(self.sensitivity.values())},
             **{f"poison{i}": stage for i, stage in enumerate(poisons)}},
        )
        gallery = Stage("gallery", {"cells": report_cells, "preset": preset.name}, "genotype gallery",
                        {f"retrain{i}": stage for i, stage in enumerate(cells)})
        return [gallery, report]


def supernets_to_keep(preset: params.Preset, algorithm: str) -> list[int] | None:
    """The epochs whose supernet a clean search must save for the crafted attacks, or None.

    NAS-specific gradient canceling needs the converged supernet (always saved once any epoch
    list is given); the alpha attack with an ensemble of e needs e snapshots evenly spaced
    over the search (workshop paper: e=6 is epochs 0, 10, ..., 50)."""
    names = {a.name for a in preset.grid.attacks}
    keep: set[int] = set()
    wanted = "gc" in names and algorithm in SUPERNET_ALGORITHMS
    for entry in preset.grid.attacks:   # the alpha attack: an ensemble of snapshots of the search it is crafted on
        if entry.name != "none" and attack_registry.ATTACKS[entry.name].crafted_on == algorithm:
            wanted = True
            epochs = getattr(preset.search, registry.ALGORITHMS[algorithm].section).epochs
            keep.update(snapshot_epochs(epochs, entry.ensemble or 1))
    return sorted(keep) if wanted else None


#: the data settings only retraining reads (its training and test images, their size)
RETRAINING_DATA = ("train_size", "test_size", "image_size")


def before_retraining(data: dict) -> dict:
    """A dataset's settings as the stages before retraining carry them (searches, poisons,
    defences, the surrogate, the metric studies): the retraining's sizes left out (None), so
    that a change of the retraining's data re-runs the retrainings only, not the searches. The
    searches read the search pool (:func:`nbutils.pipeline.steps.search_pool`: ``search_size``
    images at ``search_image_size``)."""
    return {**data, **dict.fromkeys(RETRAINING_DATA)}


def defend_stage(preset: params.Preset, data: dict, name: str, poison: Stage) -> Stage:
    spec = {"data": data, "defense": preset.defend.defense_config(name),
            "device": preset.defend.device}
    return Stage("defend", spec, f"defend with {name} against {poison.label.removeprefix('poison ')}",
                 {"poison": poison}, {**poison.meta, "defense": name})


def sensitivity_stage(preset: params.Preset, data: dict, poison: Stage, measured: str) -> Stage:
    """The metric sensitivity of ``measured``'s training-free metrics to one poison set. RoBoT's
    spec is the study's spec from before TE-NAS's metrics were added (its keys are kept);
    TE-NAS's names its metrics and carries search.yaml's TE-NAS settings that they read
    (``nbutils.studies.tenas_indicators``) and the network they are measured on."""
    sensitivity = preset.metric_sensitivity
    if measured == "robot":
        config = sensitivity.model_dump(exclude={"run", "device", "algorithms", "tenas_network"})
    elif measured == "tenas":
        used = TENAS_SETTINGS + (("operations",) if sensitivity.tenas_network == "supernet" else ())
        config = {"architectures": sensitivity.architectures, "samples": sensitivity.samples, "seed": sensitivity.seed,
                  "metrics": list(TENAS_METRICS), "tenas": {name: getattr(preset.search.tenas, name) for name in used},
                  "tenas_network": sensitivity.tenas_network}
    else:
        raise ValueError(f"no training-free metrics of {measured!r} to measure")
    spec = {"data": data, "config": config, "device": sensitivity.device}
    return Stage("sensitivity", spec, f"{measured} metric sensitivity to {poison.label.removeprefix('poison ')}",
                 {"poison": poison}, {**poison.meta, "metrics_of": measured})


def surrogate_stage(preset: params.Preset, data: dict) -> Stage:
    spec = {"data": data, "config": preset.craft_poisons.surrogate.model_dump(),
            "seed": preset.craft_poisons.seed, "device": preset.craft_poisons.device}
    on = f" on {data['dataset']}" if len(preset.grid.datasets) > 1 else ""
    return Stage("surrogate", spec, f"surrogate ResNet-18 for CLF{on}", meta={"dataset": data["dataset"]})


def clean_inputs(runs: list[tuple[Stage, Stage]]) -> dict[str, Stage]:
    """The clean trials of one algorithm as inputs: search0, retrain0, search1, ..."""
    inputs = {}
    for i, (search, retrain) in enumerate(runs):
        inputs[f"search{i}"], inputs[f"retrain{i}"] = search, retrain
    return inputs


def mark_reruns(stages: list[Stage], kinds: set[str]) -> None:
    """Mark the stages of ``kinds`` and every stage that reads one of them (stages come after
    their inputs) to run again."""
    for stage in stages:
        stage.rerun = stage.kind in kinds or any(s.rerun for s in stage.inputs.values())


def needed_by(stage: Stage, stages: list[Stage], wanted: set[int]) -> bool:
    """Whether ``stage`` is an (indirect) input of a wanted stage."""
    def reads(s: Stage) -> bool:
        return any(inp is stage or reads(inp) for inp in s.inputs.values())
    return any(reads(s) for s in stages if id(s) in wanted)
