"""The step behind each notebook, one function each: read the stage's spec and inputs,
compute, write the results into the stage's folder, return what the notebook shows.

A notebook cell reads like a sentence: ``result = steps.search(spec, inputs, out_dir)``.
The runner fills ``spec``, ``inputs`` (role -> artifact folder) and ``out_dir``; run by hand,
:func:`nbutils.pipeline.examples.example_stage` gives a stage of the notebook's ``preset`` (the lesson's
by default), computing its inputs into a scratch folder if no run has computed them.
The search and retrain notebooks take the trials of one condition at once (``trials``, a list
of those three) and run them with :func:`run_trials`.
"""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from . import params
from ..attacks.poisoning import AttackConfig, poison
from ..attacks import registry as attack_registry
from ..nas import registry
from ..nas.darts import SearchDiverged, snapshot_epochs
from ..nas.search_result import SearchResult
from ..core.datasets import load_dataset
from ..core.image_dataset import ImageDataset, channel_stats, search_split, seeded_subset, seeded_subset_indices
from ..core.device import resolve_device, seed_everything
from ..accel.supernet_choice import supernet_class
from ..space.genotype import Genotype, random_genotype
from ..space.network import EvalNetwork
from ..core.poison_set import PoisonSet
from ..core.store import atomic_write_json, load_arrays, read_json, save_arrays
from ..space.supernet import supernet_from_checkpoint
from ..training.train import RetrainConfig, retrain as retrain_network
from ..training.surrogate import resnet18_small, surrogate_logits, train_surrogate
from ..defenses.defending import DefenseConfig, defend as apply_defense
from ..studies.metric_sensitivity import metric_sensitivity as measure, summarise

log = logging.getLogger(__name__)

GENOTYPE_FILE = "genotype.json"
SUPERNETS_FILE = "supernets.pt"
#: a search's numeric trace (:attr:`SearchResult.arrays`); searches saved before the name
#: said what the file holds wrote it as ``alphas.npz``
SEARCH_ARRAYS_FILE = "arrays.npz"
OLD_SEARCH_ARRAYS_FILE = "alphas.npz"
WEIGHTS_FILE = "weights.pt"
RESULT_FILE = "result.json"


def data_params(spec: dict) -> params.DataParams:
    """A stage spec's ``data`` section, validated: which dataset, how many images, what size
    (what :func:`search_pool` and :func:`retrain_sets` take). Public for the notebooks, which
    show the clean images a stage started from."""
    return params.DataParams.model_validate(spec["data"])


def search_pool(data: params.DataParams) -> ImageDataset:
    """The clean training images the search sees (and the attacker poisons)."""
    full = load_dataset(data.dataset, "train", data.data_root, data.download, data.search_image_size)
    return seeded_subset(full, data.search_size, seed=data.subset_seed)


def retrain_sets(data: params.DataParams) -> tuple[ImageDataset, ImageDataset]:
    """Clean training and test images for retraining and the final accuracy."""
    train = load_dataset(data.dataset, "train", data.data_root, data.download, data.image_size)
    test = load_dataset(data.dataset, "test", data.data_root, data.download, data.image_size)
    return (
        seeded_subset(train, data.train_size, seed=data.subset_seed),
        seeded_subset(test, data.test_size, seed=data.subset_seed),
    )


# --- 00 surrogate ---------------------------------------------------------------------------------
SURROGATE_FILE = "surrogate.pt"


def surrogate(spec: dict, inputs: dict, out_dir: str | Path) -> dict:
    """Train CLF's surrogate ResNet-18 on the clean search data (the attacker's copy of it)."""
    out_dir = Path(out_dir)
    seed = int(spec["seed"])
    seed_everything(seed)
    device = resolve_device(spec.get("device", "auto"))
    pool = search_pool(data_params(spec))
    mean, std = channel_stats(pool)
    start = time.perf_counter()
    model = train_surrogate(pool, **spec["config"], seed=seed, device=device, mean=mean, std=std)
    seconds = time.perf_counter() - start
    train_acc = float((surrogate_logits(model, pool, mean, std, device).argmax(1) == pool.labels).float().mean())
    torch.save({"num_classes": pool.num_classes, "in_channels": pool.in_channels,
                "state": {k: v.cpu() for k, v in model.state_dict().items()}}, out_dir / SURROGATE_FILE)
    result = {"train_acc": train_acc, "seconds": seconds, "device": str(device), "images": len(pool)}
    atomic_write_json(out_dir / RESULT_FILE, result)
    return result


def load_surrogate(artifact: str | Path) -> torch.nn.Module:
    saved = torch.load(Path(artifact) / SURROGATE_FILE, weights_only=True)
    model = resnet18_small(saved["num_classes"], saved["in_channels"])
    model.load_state_dict(saved["state"])
    return model.eval()


# --- 01 craft poisons ----------------------------------------------------------------------------
def craft_poisons(spec: dict, inputs: dict, out_dir: str | Path) -> PoisonSet:
    """Craft one poison set against the clean search data and save it as the attacker publishes it."""
    attack = AttackConfig(**spec["attack"])   # a bad spec fails here, before any data is read
    device = resolve_device(spec.get("device", "auto"))
    pool = search_pool(data_params(spec))
    models = attacker_models(spec, inputs)
    seed_everything(attack.seed)
    poison_set = poison(pool, attack, models=models, device=device, normalisation=channel_stats(pool))
    if "attacker_model" in models:
        poison_set.header["attacker_model"] = models.pop("attacker_model")
    poison_set.save(Path(out_dir))
    return poison_set


def attacker_models(spec: dict, inputs: dict) -> dict:
    """What a crafted attack needs, from the artifacts it reads (empty for RLF and noise).

    Gradient canceling and the alpha attack take the clean run of highest retrained accuracy
    (TMLR §4: "the highest-accuracy networks on clean data as the target"): for a supernet
    algorithm its converged supernet, otherwise its retrained final network; the alpha attack
    the ``ensemble`` supernet snapshots of that DARTS run. The supernets are rebuilt as the
    searches ran them (``spec["fast"]``, as search.yaml's ``fast``; the fast one on the CPU
    only: :func:`nbutils.accel.supernet_choice.supernet_class`)."""
    attack = attack_registry.ATTACKS[spec["attack"]["name"]]
    if attack.needs_surrogate:
        return {"surrogate": load_surrogate(inputs["surrogate"])}
    if not attack.against_nas:
        return {}
    best = best_clean_run(inputs)
    chosen = {"search": str(best["search"]), "retrain": str(best["retrain"]), "test_acc": best["test_acc"]}
    if attack.crafted_on:   # the alpha attack: an ensemble of the clean search's supernets
        cls = _attack_supernet_class(spec)
        checkpoints = load_supernets(best["search"])
        epochs = sorted(checkpoints)
        wanted = snapshot_epochs(epochs[-1], int(spec["ensemble"]))
        missing = sorted(set(wanted) - set(epochs))
        if missing:
            raise ValueError(f"the alpha attack with ensemble {spec['ensemble']} needs supernets after epochs "
                             f"{wanted}; the clean search saved {epochs}")
        return {"supernets": [supernet_from_checkpoint(checkpoints[e], cls) for e in wanted],
                "attacker_model": {**chosen, "epochs": wanted}}
    if spec["target"]["kind"] == "alphas":
        checkpoints = load_supernets(best["search"])
        last = max(checkpoints)
        return {"target": supernet_from_checkpoint(checkpoints[last], _attack_supernet_class(spec)),
                "attacker_model": {**chosen, "kind": "alphas", "epoch": last}}
    return {"target": load_retrained(best["retrain"]), "attacker_model": {**chosen, "kind": "weights"}}


def _attack_supernet_class(spec: dict) -> type:
    """The supernet class a crafted attack rebuilds the clean search's checkpoints as: the
    poison spec's ``fast`` (search.yaml's; absent: true) on the device it crafts on."""
    return supernet_class(spec.get("fast", True), resolve_device(spec.get("device", "auto")))


def best_clean_run(inputs: dict) -> dict:
    """Of the clean trials given as search0/retrain0, search1/retrain1, ..., the one whose
    retrained network is most accurate (ties: the first)."""
    runs = []
    for role in sorted(r for r in inputs if r.startswith("retrain")):
        i = role[len("retrain"):]
        acc = read_json(Path(inputs[role]) / RESULT_FILE)["test_acc"]
        runs.append({"search": Path(inputs[f"search{i}"]), "retrain": Path(inputs[role]), "test_acc": acc})
    if not runs:
        raise ValueError("a crafted attack needs the clean runs it targets as inputs search0/retrain0, ...")
    return max(runs, key=lambda run: run["test_acc"])


# --- 02 defend ----------------------------------------------------------------------------------
DEFENDED_FILE = "defended.npz"


def defend(spec: dict, inputs: dict, out_dir: str | Path) -> dict:
    """Apply one defence to the poisoned search data; save the defended data and the record
    (which samples were dropped or relabelled or denoised, and how well, scored against the
    clean data the audit knows and the defender does not)."""
    out_dir = Path(out_dir)
    defense = DefenseConfig(**spec["defense"])   # a bad spec fails here, before any data is read
    device = resolve_device(spec.get("device", "auto"))
    seed_everything(defense.seed)
    data = data_params(spec)
    clean = search_pool(data)
    poison_set = PoisonSet.load(inputs["poison"], clean)
    poisoned = poison_set.apply(clean)
    trusted = trusted_pool(data, defense.ddpm_trusted_size) if defense.name == "denoise" and not defense.ddpm_path else None
    result = apply_defense(poisoned, defense, device=device, clean_labels=clean.labels, clean_images=clean.images,
                           poison_indices=poison_set.indices, trusted=trusted)
    save_arrays(out_dir / DEFENDED_FILE, images=result.dataset.images.numpy(), labels=result.dataset.labels.numpy())
    if result.arrays:   # per-sample details of the defence (kept indices, cluster ids, ...)
        save_arrays(out_dir / "defense_details.npz", **result.arrays)
    record = {**result.record, "poison": read_json(Path(inputs["poison"]) / "poison.json"), "device": str(device)}
    atomic_write_json(out_dir / RESULT_FILE, record)
    return {**record, "dataset": result.dataset}


def load_defended(artifact: str | Path, like: ImageDataset) -> ImageDataset:
    """The defended search data a defend stage saved (classes and name from ``like``)."""
    with np.load(Path(artifact) / DEFENDED_FILE) as saved:
        return ImageDataset(like.name, torch.from_numpy(saved["images"]), torch.from_numpy(saved["labels"]), like.classes)


def trusted_pool(data: params.DataParams, size: int) -> ImageDataset:
    """Clean training images outside the search data, which a defender holds out and trusts."""
    full = load_dataset(data.dataset, "train", data.data_root, data.download, data.search_image_size)
    searched = seeded_subset_indices(full, data.search_size, seed=data.subset_seed)
    rest = np.setdiff1d(np.arange(len(full)), searched)
    if len(rest) == 0:
        raise ValueError("denoise without a ddpm_path trains a DDPM on clean training images outside the search "
                         "data, and the search uses all of them: lower data.search_size or give ddpm_path")
    return seeded_subset(full.subset(rest), size, seed=data.subset_seed)


# --- 03 search -----------------------------------------------------------------------------------
#: algorithm -> search on (weight half, architecture half) of the search data
SEARCHES = {name: algorithm.search for name, algorithm in registry.ALGORITHMS.items()}


def search(spec: dict, inputs: dict, out_dir: str | Path) -> dict:
    """Run the spec's NAS algorithm on the (possibly poisoned) search data; save the genotype,
    the per-epoch history and the search's arrays (:attr:`SearchResult.arrays`). A diverged
    search records its error and raises."""
    out_dir = Path(out_dir)
    algorithm, seed = spec["algorithm"], int(spec["seed"])
    if algorithm != "random" and algorithm not in SEARCHES:
        raise ValueError(f"search algorithm {algorithm!r} is unknown; allowed: random, {', '.join(SEARCHES)}")
    seed_everything(seed)
    start = time.perf_counter()
    if algorithm == "random":   # ``sampler``: how a node's two inputs are drawn (search.yaml's random_sampler)
        genotype = random_genotype(np.random.default_rng(seed), sampler=spec.get("sampler", "distinct"))
        found = SearchResult(genotype=genotype)
        device = torch.device("cpu")
    else:
        device = resolve_device(spec.get("device", "auto"))
        pool = search_pool(data_params(spec))
        normalisation = channel_stats(pool)  # from the clean images, so poisons cannot shift it
        if "poison" in inputs:
            pool = PoisonSet.load(inputs["poison"], pool).apply(pool)
        elif "defended" in inputs:
            pool = load_defended(inputs["defended"], pool)
        weight_part, arch_part = search_split(pool, seed)
        try:
            found = SEARCHES[algorithm](weight_part, arch_part, spec, seed=seed, device=device,
                                        normalisation=normalisation)
        except SearchDiverged as e:
            atomic_write_json(out_dir / "error.json", {"error": str(e), "traceback": traceback.format_exc()})
            raise
    genotype = found.genotype
    if found.arrays:
        save_arrays(out_dir / SEARCH_ARRAYS_FILE, **found.arrays)
    if "keep_supernets" in spec and found.supernets:   # for the crafted attacks
        torch.save({str(epoch): c for epoch, c in found.supernets.items()}, out_dir / SUPERNETS_FILE)
    result = {"algorithm": algorithm, "seed": seed, "history": found.history, "stages": found.stages,
              "device": str(device), "seconds": time.perf_counter() - start, "summary": genotype.summary()}
    atomic_write_json(out_dir / GENOTYPE_FILE, genotype.to_dict())
    atomic_write_json(out_dir / RESULT_FILE, result)
    return {**result, "genotype": genotype}


def load_genotype(artifact: str | Path) -> Genotype:
    return Genotype.from_dict(read_json(Path(artifact) / GENOTYPE_FILE))


def load_search_arrays(artifact: str | Path) -> dict[str, np.ndarray]:
    """A search's numeric trace (:attr:`SearchResult.arrays`: alpha per epoch, RoBoT's pool
    metrics, NSGANetV2's archive, ...), from a search of any version; empty if it saved none
    (random sampling)."""
    for name in (SEARCH_ARRAYS_FILE, OLD_SEARCH_ARRAYS_FILE):
        if (Path(artifact) / name).is_file():
            return load_arrays(Path(artifact) / name)
    return {}


def load_supernets(artifact: str | Path) -> dict[int, dict]:
    """The supernet checkpoints a clean search saved: epoch -> ``SuperNet.checkpoint()``."""
    path = Path(artifact) / SUPERNETS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: this search did not keep its supernets")
    return {int(epoch): c for epoch, c in torch.load(path, weights_only=True).items()}


# --- 04 retrain ----------------------------------------------------------------------------------
def retrain(spec: dict, inputs: dict, out_dir: str | Path) -> dict:
    """Train the searched genotype from scratch on clean data; save its test accuracy and curve."""
    out_dir = Path(out_dir)
    seed = int(spec["seed"])
    seed_everything(seed)
    device = resolve_device(spec.get("device", "auto"))
    genotype = load_genotype(inputs["search"])
    train_set, test_set = retrain_sets(data_params(spec))
    result = retrain_network(genotype, train_set, test_set, RetrainConfig(**spec["config"]), seed=seed, device=device)
    model = result.pop("model")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out_dir / WEIGHTS_FILE)
    record = {**result, "seed": seed, "genotype": genotype.to_dict(), "device": str(device),
              "input_size": int(train_set.images.shape[-1])}
    atomic_write_json(out_dir / RESULT_FILE, record)
    return {**record, "genotype": genotype}


# --- 05 metric sensitivity ----------------------------------------------------------------------
SENSITIVITY_FILE = "sensitivity.csv"


def metric_sensitivity(spec: dict, inputs: dict, out_dir: str | Path) -> dict:
    """The six training-free metrics of random architectures on clean and on poisoned search
    data (TMLR Table 2); saves one row per architecture x metric and the per-metric summary."""
    out_dir = Path(out_dir)
    config = dict(spec["config"])
    seed = int(config.pop("seed"))
    device = resolve_device(spec.get("device", "auto"))
    clean = search_pool(data_params(spec))
    poisoned = PoisonSet.load(inputs["poison"], clean).apply(clean)
    config["samples"] = min(config["samples"], len(clean))
    start = time.perf_counter()
    table = measure(clean, poisoned, **config, seed=seed, device=device, normalisation=channel_stats(clean))
    summary = summarise(table)
    table.to_csv(out_dir / SENSITIVITY_FILE, index=False)
    result = {"summary": summary.to_dict(orient="records"), "seconds": time.perf_counter() - start,
              "samples": config["samples"], "device": str(device)}
    atomic_write_json(out_dir / RESULT_FILE, result)
    return {**result, "table": table, "summary_table": summary}


def load_retrained(artifact: str | Path) -> torch.nn.Module:
    """The retrained final network of a retrain artifact, with its trained weights."""
    artifact = Path(artifact)
    result = read_json(artifact / RESULT_FILE)
    config = RetrainConfig(**read_json(artifact / "spec.json")["spec"]["config"])
    state = torch.load(artifact / WEIGHTS_FILE, weights_only=True)
    stem = state["stem.0.weight"]
    model = EvalNetwork(Genotype.from_dict(result["genotype"]), channels=config.channels,
                        num_classes=state["classifier.weight"].shape[0], layers=config.layers,
                        auxiliary=config.auxiliary, in_channels=stem.shape[1], input_size=result["input_size"])
    model.load_state_dict(state)
    return model.eval()
