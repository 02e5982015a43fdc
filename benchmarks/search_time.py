"""The time of one DARTS search of the quick preset (``params/quick``), for the cost model.

    python benchmarks/search_time.py                    # the fast supernet, one thread
    python benchmarks/search_time.py --network plain    # the plain one

One search as the pipeline runs it for a clean trial (``darts_search`` on the embedded
Fashion-MNIST at 16x16, 2000 search images in two halves, the preset's ``darts:`` settings,
seed 0, one thread, as each of the runner's two workers). Prints the wall and CPU seconds and
the search's work units of :mod:`nbutils.pipeline.cost_model`, whose ratio is the seconds per
unit that ``MODELLED_SECONDS_PER_UNIT["search darts"]`` models. Results: ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", choices=("fast", "plain"), default="fast")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (a shorter run)")
    args = parser.parse_args()

    import torch
    import yaml

    from nbutils.core.datasets import load_dataset
    from nbutils.core.image_dataset import channel_stats, search_split, seeded_subset
    from nbutils.core.malloc import keep_freed_memory
    from nbutils.nas.darts import DartsConfig, darts_search
    from nbutils.pipeline.cost_model import work_units

    keep_freed_memory()   # as the runner's kernels do
    torch.set_num_threads(args.threads)
    grid = yaml.safe_load((ROOT / "params" / "quick" / "grid.yaml").read_text())
    search = yaml.safe_load((ROOT / "params" / "quick" / "search.yaml").read_text())
    darts = dict(search["darts"])
    if args.epochs is not None:
        darts["epochs"] = args.epochs
    data = grid["data"]
    side = data["search_image_size"]
    pool = seeded_subset(load_dataset(data["dataset"], "train", None, False, side), data["search_size"], 0)
    weight_part, arch_part = search_split(pool, 0)
    config = DartsConfig(**darts, augment=search.get("augment", True), fast=args.network == "fast")
    wall, cpu = time.perf_counter(), time.process_time()
    result = darts_search(weight_part, arch_part, config, seed=0, device=torch.device("cpu"),
                          normalisation=channel_stats(pool))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    units = work_units("search", {"algorithm": "darts", "data": data, "config": darts})
    print(f"{args.network} supernet, {args.threads} thread(s), {darts['epochs']} epochs: {wall:.1f} s wall, "
          f"{cpu:.1f} s CPU; {units:.0f} units: {wall / units:.4f} s/unit wall, {cpu / units:.4f} CPU; "
          f"cell {result.genotype.summary() if hasattr(result.genotype, 'summary') else result.genotype}")


if __name__ == "__main__":
    main()
