"""NTK condition number: the reference loop (one backward per sample) against the batched
version (one vectorised backward through the same batched forward), on the CPU.

    python benchmarks/ntk_speed.py [--repeats 3] [--threads 1] [--quick]

Settings:

* ``tenas``: TE-NAS's DARTS-space setting on CIFAR-10 (``prune_launch.py --space darts``):
  batch 14, 32x32x3 inputs, a supernet with C=1, two cells (normal, reduction), stem
  multiplier 1, all 7 non-``none`` operations on every edge (uniform weights), affine BN,
  BN + ReLU before global pooling, 10 classes. Built from nbutils' search cells, so it differs
  from TE-NAS's only in details that do not matter for timing (pools are followed by a BN).
* ``small``: the same supernet on 8 inputs of 8x8.
* ``wider``: C=4, batch 14, 32x32: where batching stops paying on this hardware.

For each: seconds (best of ``--repeats``) of the loop and of the batched version, with the
CPU convolution backend as the code chooses it (oneDNN off for C<=2 networks) and forced on,
the speed-up over the reference loop (default backend), and the relative difference of kappa.
Inputs are random normals (kappa's value is not the point). Runs well under 5 minutes on two
shared cores with one thread.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from nbutils.genotype import NUM_EDGES
from nbutils.ntk import ntk_condition_number, ntk_condition_number_loop
from nbutils.ops import PRIMITIVES
from nbutils.supernet import SearchCell


class TenasSupernet(nn.Module):
    """A TE-NAS-shaped DARTS supernet: stem (C channels), a normal and a reduction cell with
    every non-``none`` operation on each edge, BN + ReLU, global pooling, linear classifier."""

    def __init__(self, channels: int = 1, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        ops = tuple(p for p in PRIMITIVES if p != "none")
        switches = [ops] * NUM_EDGES
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.cells = nn.ModuleList([
            SearchCell(c, c, c, reduction=False, reduction_prev=False, switches=switches),
            SearchCell(c, 4 * c, 2 * c, reduction=True, reduction_prev=False, switches=switches),
        ])
        self.lastact = nn.Sequential(nn.BatchNorm2d(8 * c), nn.ReLU())
        self.classifier = nn.Linear(8 * c, num_classes)
        self.register_buffer("op_weights", torch.full((NUM_EDGES, len(ops)), 1.0 / len(ops)))
        _make_batchnorm_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, self.op_weights)
        return self.classifier(F.adaptive_avg_pool2d(self.lastact(s1), 1).flatten(1))


def _make_batchnorm_affine(module: nn.Module) -> None:
    """TE-NAS's supernet uses affine BN (its BN weights enter the NTK); nbutils' search cells do
    not: swap them."""
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and not child.affine:
                setattr(parent, name, nn.BatchNorm2d(child.num_features))


def best_of(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def run(name: str, channels: int, batch: int, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    net = TenasSupernet(channels)
    x = torch.randn(batch, 3, size, size)
    n_weights = sum(p.numel() for n, p in net.named_parameters() if "weight" in n)
    ntk_condition_number(net, x)  # warm-up (allocator, oneDNN primitives)
    t_loop, loop = best_of(lambda: ntk_condition_number_loop(net, x), repeats)
    t_fast, fast = best_of(lambda: ntk_condition_number(net, x), repeats)
    t_fast_on, fast_on = best_of(lambda: ntk_condition_number(net, x, mkldnn=True), repeats)
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        t_loop_off, loop_off = best_of(lambda: ntk_condition_number_loop(net, x), repeats)
    finally:
        torch.backends.mkldnn.enabled = before
    rel = max(abs(r.kappa - loop.kappa) / abs(loop.kappa) for r in (fast, fast_on, loop_off))
    print(
        f"{name:6s} C={channels} N={batch:2d} {size}x{size} weights={n_weights:6d} | "
        f"loop {t_loop:6.3f}s | batched {t_fast:6.3f}s  x{t_loop / t_fast:4.2f} | "
        f"batched (oneDNN on) {t_fast_on:6.3f}s  x{t_loop / t_fast_on:4.2f} | "
        f"loop (oneDNN off) {t_loop_off:6.3f}s  x{t_loop / t_loop_off:4.2f} | "
        f"kappa {loop.kappa:.6g} (max rel diff {rel:.1e})",
        flush=True,
    )
    return {"loop": t_loop, "batched": t_fast, "rel_diff": rel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="TE-NAS and small settings only, 2 repeats")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), oneDNN available: "
          f"{torch.backends.mkldnn.is_available()}; times are the best of {repeats}")
    start = time.perf_counter()
    run("tenas", 1, 14, 32, repeats)
    run("small", 1, 8, 8, repeats)
    if not args.quick:
        run("wider", 4, 14, 32, repeats)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
