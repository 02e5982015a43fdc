"""What the default preset's budgets buy: retrained accuracy and its spread against the
retraining budget, and the found cells' accuracy against the search budget.

    python benchmarks/calibrate.py retrain [--budgets 5000x3 10000x3] [--seeds 0 1] [--jobs 2]
    python benchmarks/calibrate.py retrain --found outputs/trials.csv [--budgets 20000x3] [--seeds 0 1]
    python benchmarks/calibrate.py search  [--budgets 1000x4 2000x5] [--trials 4] [--jobs 2]

Both on the embedded Fashion-MNIST at 16x16 (the default preset's image size), each run on one
thread, ``--jobs`` runs at a time. Cost is each run's CPU seconds (``time.process_time``): on one
thread it is the wall time an idle core would take, and unlike wall time it barely moves when
other work shares the machine.

``retrain``: a budget ``NxE`` trains on N clean images for E epochs (``RetrainConfig`` below,
the default preset's recipe) and tests on ``--test-size`` images. Three kinds of cell: DARTS'
published DARTS_V2, ``--random`` random cells (``random_genotype``), and an all-pooling cell
(what an anti-search tends to find). Prints each cell's accuracy over the seeds, and the spread
of the random cells. ``--found trials.csv`` retrains instead the cells a run found (an outputs
folder's ``trials.csv``; e.g. ``--cells darts_anti`` keeps anti-search's), named by condition and
trial ("darts_anti/none 0"): with two or more seeds, each condition's spread splits into the
spread between its cells and the retraining's own (between seeds of one cell), which says whether
a longer retraining could narrow a condition's spread at all.

``search``: a budget ``NxE`` searches with DARTS on N images (halves for weights and
architecture) for E epochs, then retrains the found cell at ``--retrain``. Three conditions:
clean, anti-search (the workshop paper's Table 1) and random label flipping of 50% of the
search data (TMLR Table 1's stress test). Prints per condition the accuracy over the trials,
its standard deviation, the smallest drop the report's test could detect at that spread
(``detectable_drop``, power 0.8), the one-sided Welch p-value against clean, and the CPU
seconds of search and retraining. Results and the choice made from them:
``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time

import numpy as np

IMAGE_SIZE = 16
SEARCH = dict(channels=8, layers=5, batch_size=64, arch_lr=3e-3)
RETRAIN = dict(channels=12, layers=5, batch_size=64, lr=0.05, drop_path=0.1, cutout=0, augment=False,
               auxiliary=True)


def budget(text: str) -> tuple[int, int]:
    try:
        images, epochs = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a budget is IMAGESxEPOCHS, e.g. 10000x3; got {text!r}") from None
    if images < 2 or epochs < 1:
        raise argparse.ArgumentTypeError(f"a budget needs >= 2 images and >= 1 epoch; got {text!r}")
    return images, epochs


def _datasets(train_size: int, test_size: int):
    from nbutils.core.datasets import load_dataset
    from nbutils.core.image_dataset import seeded_subset

    train = seeded_subset(load_dataset("fashion_mnist", "train", None, False, IMAGE_SIZE), train_size, 0)
    test = seeded_subset(load_dataset("fashion_mnist", "test", None, False, IMAGE_SIZE), test_size, 0)
    return train, test


def _retrain(genotype, train_size: int, epochs: int, test_size: int, seed: int, threads: int,
             lr_schedule: str = "epoch") -> dict:
    import torch

    from nbutils.training.train import RetrainConfig, retrain

    torch.set_num_threads(threads)
    train, test = _datasets(train_size, test_size)
    start = time.process_time()
    result = retrain(genotype, train, test, RetrainConfig(epochs=epochs, lr_schedule=lr_schedule, **RETRAIN), seed=seed,
                     device=torch.device("cpu"))
    return {"acc": 100 * result["test_acc"], "retrain_cpu_s": time.process_time() - start}


def _cells(random_cells: int) -> dict:
    from nbutils.space.genotype import Genotype, published, random_genotype

    pooling = [("max_pool_3x3", 0), ("avg_pool_3x3", 1)] * 4
    cells = {"DARTS_V2": published("DARTS_V2"), "all-pooling": Genotype(normal=pooling, reduce=pooling)}
    cells.update({f"random{i}": random_genotype(np.random.default_rng(i)) for i in range(random_cells)})
    return cells


def found_cells(trials_csv: str) -> dict:
    """The cells of a run's ``trials.csv``, named "algorithm/attack[ budget] trial"."""
    import csv

    from nbutils.space.genotype import Genotype

    cells = {}
    with open(trials_csv, newline="") as f:
        for row in csv.DictReader(f):
            condition = "/".join(v for v in (row["algorithm"], row["attack"], row["budget"]) if v)
            cells[f"{condition} {row['trial']}"] = Genotype.from_dict(json.loads(row["genotype"]))
    return cells


def retrain_job(job: dict) -> dict:
    cells = found_cells(job["found"]) if job.get("found") else _cells(job["random_cells"])
    return {**job, **_retrain(cells[job["cell"]], job["images"], job["epochs"], job["test_size"], job["seed"], 1,
                              job.get("lr_schedule", "epoch"))}


def search_job(job: dict) -> dict:
    import torch

    from nbutils.attacks.data_only import random_label_flip
    from nbutils.attacks.poisoning import AttackConfig
    from nbutils.core.datasets import load_dataset
    from nbutils.core.image_dataset import channel_stats, search_split, seeded_subset
    from nbutils.nas.darts import DartsConfig, darts_search

    torch.set_num_threads(1)
    seed = job["trial"]
    pool = seeded_subset(load_dataset("fashion_mnist", "train", None, False, IMAGE_SIZE), job["images"], 0)
    normalisation = channel_stats(pool)
    if job["condition"] == "rlf-50%":
        pool = random_label_flip(pool, AttackConfig("rlf", 0.5, seed=seed)).apply(pool)
    weight_part, arch_part = search_split(pool, seed)
    config = DartsConfig(epochs=job["epochs"], anti=job["condition"] == "anti-search", **SEARCH)
    start = time.process_time()
    found = darts_search(weight_part, arch_part, config, seed=seed, device=torch.device("cpu"),
                         normalisation=normalisation)
    search_cpu = time.process_time() - start
    retrained = _retrain(found.genotype, *job["retrain"], job["test_size"], seed, 1)
    return {**job, **retrained, "search_cpu_s": search_cpu, "summary": found.genotype.summary()}


def _run(function, jobs: list[dict], processes: int, log) -> list[dict]:
    results = []
    with mp.get_context("spawn").Pool(processes) as pool:
        for result in pool.imap_unordered(function, jobs):
            log.write(json.dumps(result, default=str) + "\n")
            log.flush()
            results.append(result)
    return results


def _mean_std(values: list[float]) -> str:
    values = np.asarray(values, dtype=float)
    std = values.std(ddof=1) if len(values) > 1 else math.nan
    return f"{values.mean():6.2f} +- {std:4.2f}"


def _retrain_budget(run: dict) -> tuple[int, int, str]:
    return run["images"], run["epochs"], run.get("lr_schedule", "epoch")


def print_retrain_table(results: list[dict]) -> None:
    print(f"\n{'budget':>10} {'schedule':>8} {'cell':>12} {'accuracy (seeds)':>18} {'CPU s/run':>10}")
    for key in sorted({_retrain_budget(r) for r in results}):
        rows = [r for r in results if _retrain_budget(r) == key]
        for cell in sorted({r["cell"] for r in rows}):
            mine = [r for r in rows if r["cell"] == cell]
            print(f"{key[0]:>6}x{key[1]:<3} {key[2]:>8} {cell:>12} {_mean_std([r['acc'] for r in mine]):>18} "
                  f"{np.mean([r['retrain_cpu_s'] for r in mine]):10.0f}")
        random_means = [np.mean([r["acc"] for r in rows if r["cell"] == c])
                        for c in {r["cell"] for r in rows if r["cell"].startswith("random")}]
        if len(random_means) > 1:
            print(f"{'':>10} {'random cells':>12} {_mean_std(random_means):>18}   (spread between cells)")
        print_spread_split(rows)


def print_spread_split(rows: list[dict]) -> None:
    """Per condition of found cells ("condition trial"), with two or more seeds per cell: the
    standard deviation over all runs, that of the cells' means (between cells), and the pooled
    standard deviation between seeds of one cell (the retraining's own)."""
    conditions = sorted({r["cell"].rsplit(" ", 1)[0] for r in rows if " " in r["cell"]})
    for condition in conditions:
        cells = sorted({r["cell"] for r in rows if r["cell"].rsplit(" ", 1)[0] == condition})
        accs = {c: [r["acc"] for r in rows if r["cell"] == c] for c in cells}
        if len(cells) < 2 or min(len(a) for a in accs.values()) < 2:
            continue
        within = math.sqrt(np.mean([np.var(a, ddof=1) for a in accs.values()]))
        between = float(np.std([np.mean(a) for a in accs.values()], ddof=1))
        every = float(np.std([v for a in accs.values() for v in a], ddof=1))
        print(f"{'':>10} {condition:>12}   all runs sd {every:4.2f}, between cells {between:4.2f}, "
              f"between seeds of a cell {within:4.2f}")


def print_search_table(results: list[dict]) -> None:
    from nbutils.report.stats import detectable_drop, welch_less

    print(f"\n{'search':>10} {'condition':>12} {'n':>2} {'accuracy':>16} {'detectable':>10} {'p (< clean)':>11} "
          f"{'search CPU s':>12} {'retrain CPU s':>13}")
    for key in sorted({(r["images"], r["epochs"]) for r in results}):
        rows = [r for r in results if (r["images"], r["epochs"]) == key]
        clean = [r["acc"] for r in rows if r["condition"] == "clean"]
        for condition in ("clean", "anti-search", "rlf-50%"):
            accs = [r["acc"] for r in rows if r["condition"] == condition]
            if not accs:
                continue
            std = float(np.std(accs, ddof=1)) if len(accs) > 1 else math.nan
            p = welch_less(accs, clean) if condition != "clean" and len(clean) > 1 else math.nan
            drop = detectable_drop(std, len(accs), len(clean))
            mine = [r for r in rows if r["condition"] == condition]
            print(f"{key[0]:>6}x{key[1]:<3} {condition:>12} {len(accs):>2} {_mean_std(accs):>16} {drop:10.2f} "
                  f"{p:11.4f} {np.mean([r['search_cpu_s'] for r in mine]):12.0f} "
                  f"{np.mean([r['retrain_cpu_s'] for r in mine]):13.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("retrain", "search"))
    parser.add_argument("--budgets", type=budget, nargs="+", help="IMAGESxEPOCHS (default: per mode)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="retrain: seeds per cell")
    parser.add_argument("--random", type=int, default=3, help="retrain: random cells")
    parser.add_argument("--cells", nargs="+",
                        help="retrain: only these cells (e.g. DARTS_V2 random0), or with --found, the cells whose "
                             "names start with one of these (e.g. darts_anti)")
    parser.add_argument("--lr-schedule", choices=("epoch", "step"), default="epoch",
                        help="retrain: the cosine schedule's rate changes per epoch or per step")
    parser.add_argument("--found", help="retrain: the cells of this trials.csv instead of the built-in ones")
    parser.add_argument("--trials", type=int, default=4, help="search: trials per condition")
    parser.add_argument("--conditions", nargs="+", default=["clean", "anti-search", "rlf-50%"],
                        choices=["clean", "anti-search", "rlf-50%"])
    parser.add_argument("--retrain", type=budget, default=(10000, 3), help="search: the retraining budget")
    parser.add_argument("--test-size", type=int, default=5000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--log", default="calibrate.jsonl", help="every run as a JSON line (appended)")
    parser.add_argument("--table", help="print the tables of a --log file instead of running")
    args = parser.parse_args()

    if args.table:
        results = [json.loads(line) for line in open(args.table)]
        results = [r for r in results if ("condition" in r) == (args.what == "search")]
    elif args.what == "retrain":
        if args.found:
            cells = [c for c in found_cells(args.found) if not args.cells or c.startswith(tuple(args.cells))]
        else:
            cells = args.cells or list(_cells(args.random))
        jobs = [{"images": n, "epochs": e, "cell": c, "seed": s, "test_size": args.test_size,
                 "random_cells": args.random, "found": args.found,
                 "lr_schedule": args.lr_schedule}
                for n, e in (args.budgets or [(5000, 3), (10000, 3)]) for c in cells for s in args.seeds]
        with open(args.log, "a") as log:
            results = _run(retrain_job, jobs, args.jobs, log)
    else:
        jobs = [{"images": n, "epochs": e, "condition": c, "trial": t, "retrain": list(args.retrain),
                 "test_size": args.test_size}
                for n, e in (args.budgets or [(1000, 4), (2000, 5)]) for t in range(args.trials)
                for c in args.conditions]
        with open(args.log, "a") as log:
            results = _run(search_job, jobs, args.jobs, log)
    (print_retrain_table if args.what == "retrain" else print_search_table)(results)
    print(f"\nretraining recipe: {RETRAIN}; search: {SEARCH}; images {IMAGE_SIZE}x{IMAGE_SIZE}")


if __name__ == "__main__":
    main()
