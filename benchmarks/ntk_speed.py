"""NTK condition number: the reference loop (one backward per sample) against the batched
version (one vectorised backward through the same batched forward), on the CPU.

    python benchmarks/ntk_speed.py [--repeats 3] [--threads 1] [--quick]

Networks: :class:`nbutils.tenas.TenasNetwork`, the supernet TE-NAS measures (``C = 1``, a
normal and a reduction cell, stem multiplier 1, affine BN, pools without BN, BN + ReLU before
global pooling, all 7 non-``none`` operations on every edge, 10 classes). Settings:

* ``tenas``: TE-NAS's DARTS-space setting on CIFAR-10 (``prune_launch.py --space darts``):
  batch 14 of 32x32x3 images.
* ``quick``: the quick preset's search data, batch 14 of 16x16x1 (Fashion-MNIST resized).
* ``small``: batch 8 of 8x8x1, the size of the tests.
* ``wider`` (not with ``--quick``): C = 4, batch 14, 32x32x3.

For each: the time (best of ``--repeats``) of the reference loop (PyTorch's default CPU
backend), of the batched version as the code runs it (oneDNN off for networks whose median
convolution has at most 2 output channels) and with oneDNN forced on, the speed-up over the
loop, and the largest relative difference of kappa from the loop's. Times are wall-clock and,
in brackets, the process's CPU time, which a busy shared machine disturbs less. Inputs are
random normals (kappa's value is not the point).
"""
from __future__ import annotations

import argparse
import time

import torch

from nbutils.ntk import ntk_condition_number, ntk_condition_number_loop
from nbutils.tenas import TenasNetwork, initial_switches


def best_of(fn, repeats: int):
    """(best wall seconds, best CPU seconds, last result)."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result


def run(name: str, channels: int, batch: int, size: int, in_channels: int, repeats: int) -> dict:
    torch.manual_seed(0)
    net = TenasNetwork(initial_switches(), channels=channels, num_classes=10, in_channels=in_channels).train()
    x = torch.randn(batch, in_channels, size, size)
    n_weights = sum(p.numel() for n, p in net.named_parameters() if "weight" in n)
    ntk_condition_number(net, x)  # warm-up (allocator, oneDNN primitives)
    loop_wall, loop_cpu, loop = best_of(lambda: ntk_condition_number_loop(net, x), repeats)
    fast_wall, fast_cpu, fast = best_of(lambda: ntk_condition_number(net, x), repeats)
    on_wall, on_cpu, fast_on = best_of(lambda: ntk_condition_number(net, x, mkldnn=True), repeats)
    rel = max(abs(r.kappa - loop.kappa) / abs(loop.kappa) for r in (fast, fast_on))
    print(
        f"{name:6s} C={channels} N={batch:2d} {size}x{size}x{in_channels} weights={n_weights:6d} | "
        f"loop {loop_wall:6.3f}s ({loop_cpu:6.3f}) | "
        f"batched {fast_wall:6.3f}s ({fast_cpu:6.3f})  x{loop_wall / fast_wall:4.2f} (x{loop_cpu / fast_cpu:4.2f}) | "
        f"batched, oneDNN on {on_wall:6.3f}s ({on_cpu:6.3f})  x{loop_wall / on_wall:4.2f} | "
        f"kappa {loop.kappa:.6g} (max rel diff {rel:.1e})",
        flush=True,
    )
    return {"loop": loop_wall, "batched": fast_wall, "rel_diff": rel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="no 'wider' setting, 2 repeats")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), oneDNN available: "
          f"{torch.backends.mkldnn.is_available()}; best of {repeats}; wall seconds (CPU seconds)")
    start = time.perf_counter()
    run("tenas", 1, 14, 32, 3, repeats)
    run("quick", 1, 14, 16, 1, repeats)
    run("small", 1, 8, 8, 1, repeats)
    if not args.quick:
        run("wider", 4, 14, 32, 3, repeats)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
