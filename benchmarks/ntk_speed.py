"""NTK condition number: the reference loop (one backward per sample) against the batched
version (one vectorised backward through the same batched forward), on the CPU.

    python benchmarks/ntk_speed.py [--repeats 5] [--threads 1] [--quick] [--mkldnn auto|on|off]

Networks: :class:`nbutils.nas.tenas_network.TenasNetwork`, the supernet TE-NAS measures (``C = 1``, a
normal and a reduction cell, stem multiplier 1, affine BN, pools without BN, BN + ReLU before
global pooling, all 7 non-``none`` operations on every edge, 10 classes). Settings:

* ``tenas``: TE-NAS's DARTS-space setting on CIFAR-10 (``prune_launch.py --space darts``):
  batch 14 of 32x32x3 images.
* ``quick``: the quick preset's search data, batch 14 of 16x16x1 (Fashion-MNIST resized).
* ``small``: batch 8 of 8x8x1, the size of the tests.
* ``wider`` (not with ``--quick``): C = 4, batch 14, 32x32x3.

For each: the time (best of ``--repeats``) of the reference loop (PyTorch's default CPU
backend), of the two batched ways (``method="vmap"``: one vectorised backward, oneDNN off for
networks whose median convolution has at most 2 output channels; ``method="replicas"``: the
rows as replicas in one ordinary backward, :mod:`nbutils.nas.ntk_replicas`), which one
``method="auto"`` takes, the speed-ups over the loop, and the largest relative difference of
kappa from the loop's. Times are wall-clock and, in brackets, the process's CPU time, which a
busy shared machine disturbs less. The runs of the three alternate, so that a change in the
machine's load hits all of them. Inputs are random normals (kappa's value is not the point).

``--mkldnn on`` / ``off`` forces oneDNN on or off for the vmap way (``mkldnn=True`` / ``False``
of :func:`nbutils.nas.ntk.ntk_condition_number`; default ``auto``, its own choice): run both
to compare the two CPU convolution backends.
"""
from __future__ import annotations

import argparse
import time

import torch

from nbutils.nas.ntk import choose_method, ntk_condition_number, ntk_condition_number_loop
from nbutils.nas.tenas_network import TenasNetwork, initial_switches


MKLDNN = {"auto": None, "on": True, "off": False}


def run(name: str, channels: int, batch: int, size: int, in_channels: int, repeats: int,
        mkldnn: bool | None = None) -> dict:
    torch.manual_seed(0)
    net = TenasNetwork(initial_switches(), channels=channels, num_classes=10, in_channels=in_channels).train()
    x = torch.randn(batch, in_channels, size, size)
    n_weights = sum(p.numel() for n, p in net.named_parameters() if "weight" in n)
    methods = {
        "loop": lambda: ntk_condition_number_loop(net, x),
        "vmap": lambda: ntk_condition_number(net, x, method="vmap", mkldnn=mkldnn),
        "replicas": lambda: ntk_condition_number(net, x, method="replicas"),
    }
    for fn in methods.values():
        fn()   # warm-up (allocator, oneDNN primitives)
    walls = {k: [] for k in methods}
    cpus = {k: [] for k in methods}
    results = {}
    for _ in range(repeats):
        for key, fn in methods.items():
            wall, cpu = time.perf_counter(), time.process_time()
            results[key] = fn()
            walls[key].append(time.perf_counter() - wall)
            cpus[key].append(time.process_time() - cpu)
    wall = {k: min(v) for k, v in walls.items()}
    cpu = {k: min(v) for k, v in cpus.items()}
    loop = results["loop"]
    rel = max(abs(results[k].kappa - loop.kappa) / abs(loop.kappa) for k in ("vmap", "replicas"))
    auto = choose_method(net, x)
    print(
        f"{name:6s} C={channels} N={batch:2d} {size}x{size}x{in_channels} weights={n_weights:6d} | "
        f"loop {wall['loop']:6.3f}s ({cpu['loop']:6.3f}) | "
        + " | ".join(f"{k} {wall[k]:6.3f}s ({cpu[k]:6.3f}) x{wall['loop'] / wall[k]:4.2f} (x{cpu['loop'] / cpu[k]:4.2f})"
                     for k in ("vmap", "replicas"))
        + f" | auto: {auto} | kappa {loop.kappa:.6g} (max rel diff {rel:.1e})",
        flush=True,
    )
    return {"wall": wall, "cpu": cpu, "rel_diff": rel, "auto": auto}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="no 'wider' setting, 2 repeats")
    parser.add_argument("--mkldnn", choices=sorted(MKLDNN), default="auto",
                        help="oneDNN for the vmap way: on, off, or ntk_condition_number's own choice (auto)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), oneDNN available: "
          f"{torch.backends.mkldnn.is_available()}; vmap's oneDNN: {args.mkldnn}; best of {repeats}; "
          "wall seconds (CPU seconds)")
    mkldnn = MKLDNN[args.mkldnn]
    start = time.perf_counter()
    run("tenas", 1, 14, 32, 3, repeats, mkldnn)
    run("quick", 1, 14, 16, 1, repeats, mkldnn)
    run("small", 1, 8, 8, 1, repeats, mkldnn)
    if not args.quick:
        run("wider", 4, 14, 32, 3, repeats, mkldnn)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
