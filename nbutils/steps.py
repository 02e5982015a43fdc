"""The step behind each notebook, one function each: read the stage's spec and inputs,
compute, write the results into the stage's folder, return what the notebook shows.

A notebook cell reads like a sentence: ``result = steps.search(spec, inputs, out_dir)``.
The runner fills ``spec``, ``inputs`` (role -> artifact folder) and ``out_dir``; run by hand,
``example_stage`` gives the first stage of a preset's kind with its inputs found in the store.
"""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from . import params
from .attacks import AttackSpec, poison
from .darts import DartsConfig, SearchDiverged, darts_search
from .data import ImageDataset, channel_stats, load_dataset, search_split, seeded_subset
from .device import resolve_device, seed_everything
from .genotype import Genotype, random_genotype
from .poison_set import PoisonSet
from .store import atomic_write_json, read_json, save_arrays
from .train import RetrainConfig, retrain as retrain_network

log = logging.getLogger(__name__)

GENOTYPE_FILE = "genotype.json"
RESULT_FILE = "result.json"


def _data(spec: dict) -> params.DataSpec:
    return params.DataSpec.model_validate(spec["data"])


def search_pool(data: params.DataSpec) -> ImageDataset:
    """The clean training images the search sees (and the attacker poisons)."""
    full = load_dataset(data.dataset, "train", data.data_root, data.download, data.search_image_size)
    return seeded_subset(full, data.search_size, seed=data.subset_seed)


def retrain_sets(data: params.DataSpec) -> tuple[ImageDataset, ImageDataset]:
    """Clean training and test images for retraining and the final accuracy."""
    train = load_dataset(data.dataset, "train", data.data_root, data.download, data.image_size)
    test = load_dataset(data.dataset, "test", data.data_root, data.download, data.image_size)
    return (
        seeded_subset(train, data.train_size, seed=data.subset_seed),
        seeded_subset(test, data.test_size, seed=data.subset_seed),
    )


# --- 01 craft poisons ----------------------------------------------------------------------------
def craft_poisons(spec: dict, inputs: dict, out_dir: str | Path) -> PoisonSet:
    pool = search_pool(_data(spec))
    poison_set = poison(pool, AttackSpec(**spec["attack"]))
    poison_set.save(Path(out_dir))
    return poison_set


# --- 03 search -----------------------------------------------------------------------------------
def search(spec: dict, inputs: dict, out_dir: str | Path) -> dict:
    """Run the spec's NAS algorithm on the (possibly poisoned) search data; save the genotype."""
    out_dir = Path(out_dir)
    algorithm, seed = spec["algorithm"], int(spec["seed"])
    seed_everything(seed)
    start = time.perf_counter()
    if algorithm == "random":
        genotype = random_genotype(np.random.default_rng(seed))
        result = {"algorithm": algorithm, "seed": seed, "history": []}
    elif algorithm in ("darts", "darts_anti"):
        device = resolve_device(spec.get("device", "auto"))
        pool = search_pool(_data(spec))
        normalisation = channel_stats(pool)  # from the clean images, so poisons cannot shift it
        if "poison" in inputs:
            pool = PoisonSet.load(inputs["poison"], pool).apply(pool)
        weight_part, arch_part = search_split(pool, seed)
        config = DartsConfig(**spec["config"], augment=spec["augment"], anti=algorithm == "darts_anti")
        try:
            found = darts_search(weight_part, arch_part, config, seed=seed, device=device, normalisation=normalisation)
        except SearchDiverged as e:
            atomic_write_json(out_dir / "error.json", {"error": str(e), "traceback": traceback.format_exc()})
            raise
        genotype = found.genotype
        save_arrays(out_dir / "alphas.npz", **found.alphas)
        result = {"algorithm": algorithm, "seed": seed, "history": found.history, "device": str(device)}
    else:
        raise ValueError(f"search algorithm {algorithm!r} is unknown; allowed: random, darts, darts_anti")
    result["seconds"] = time.perf_counter() - start
    result["summary"] = genotype.summary()
    atomic_write_json(out_dir / GENOTYPE_FILE, genotype.to_dict())
    atomic_write_json(out_dir / RESULT_FILE, result)
    return {**result, "genotype": genotype}


def load_genotype(artifact: str | Path) -> Genotype:
    return Genotype.from_dict(read_json(Path(artifact) / GENOTYPE_FILE))


# --- 04 retrain ----------------------------------------------------------------------------------
def retrain(spec: dict, inputs: dict, out_dir: str | Path) -> dict:
    """Train the searched genotype from scratch on clean data; save its test accuracy and curve."""
    out_dir = Path(out_dir)
    seed = int(spec["seed"])
    seed_everything(seed)
    device = resolve_device(spec.get("device", "auto"))
    genotype = load_genotype(inputs["search"])
    train_set, test_set = retrain_sets(_data(spec))
    result = retrain_network(genotype, train_set, test_set, RetrainConfig(**spec["config"]), seed=seed, device=device)
    model = result.pop("model")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out_dir / "weights.pt")
    record = {**result, "seed": seed, "genotype": genotype.to_dict(), "device": str(device)}
    atomic_write_json(out_dir / RESULT_FILE, record)
    return {**record, "genotype": genotype}


def example_stage(kind: str, preset: str = "quick", outputs: str | Path | None = None) -> tuple[dict, dict, str]:
    """For running a step notebook by hand: the first stage of ``kind`` in a preset, its inputs
    resolved in the store (they must exist: run ``python -m nbutils run params/<preset>`` first),
    and a scratch folder to write into."""
    from .runner import example

    return example(kind, preset, outputs)
