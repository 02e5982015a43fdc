"""Throughput and peak memory of the plain ``SuperNet`` against ``FastSuperNet``.

    python benchmarks/supernet_speed.py            # both configurations (several minutes)
    python benchmarks/supernet_speed.py --quick    # the quick preset's configuration only

Two configurations:

* ``darts``: DARTS' search setting, C=16, 8 cells, batch 64, 3x32x32 inputs, 10 classes;
* ``quick``: the quick preset's search, C=8, 5 cells, batch 64, 1x16x16 inputs, 10 classes.

Two steps, as ``nbutils.darts.darts_search`` runs them:

* weight step: forward, cross-entropy, backward w.r.t. the weights, gradient clipping, SGD
  (momentum 0.9, weight decay 3e-4);
* architecture step: forward, cross-entropy, backward w.r.t. the two alphas, Adam.

Throughput is images per second, from the median time of the timed iterations (warm-up
iterations, which create oneDNN primitives and grow the heap, are excluded). Both networks
start from the same parameters and see the same random batches. ``torch.set_num_threads(2)``.

Peak memory: each (configuration, network) pair runs in a fresh child process (this script
with ``--child``). PyTorch's CPU allocations are invisible to ``tracemalloc``, so the child
reads its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) once the
model, optimisers and data exist, and again after all steps: the difference is the peak
memory the steps added (activations kept for backward, gradients, optimiser state). The
numbers include allocator slack and are a few MB coarse.

The machine may be shared: times on a busy machine are noisy, so the script prints every
iteration's time as well as the median.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "darts": dict(channels=16, layers=8, batch=64, in_channels=3, size=32, num_classes=10),
    "quick": dict(channels=8, layers=5, batch=64, in_channels=1, size=16, num_classes=10),
}


def _maxrss_mb() -> float:
    import resource as r
    return r.getrusage(r.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: kilobytes


def child(config: str, impl: str, warmup: int, iters: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nbutils.fast_supernet import FastSuperNet
    from nbutils.supernet import SuperNet

    torch.set_num_threads(threads)
    cfg = CONFIGS[config]
    cls = FastSuperNet if impl == "fast" else SuperNet
    torch.manual_seed(0)
    model = cls(channels=cfg["channels"], num_classes=cfg["num_classes"], layers=cfg["layers"],
                in_channels=cfg["in_channels"], seed=0)
    model.train()
    weights = list(model.weights())
    w_opt = torch.optim.SGD(weights, 0.025, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    g = torch.Generator().manual_seed(1)
    n = warmup + iters
    shape = (cfg["batch"], cfg["in_channels"], cfg["size"], cfg["size"])
    xs = [torch.randn(shape, generator=g) for _ in range(2 * n)]
    ys = [torch.randint(0, cfg["num_classes"], (cfg["batch"],), generator=g) for _ in range(2 * n)]
    rss_before = _maxrss_mb()

    def weight_step(i: int) -> float:
        t = time.perf_counter()
        w_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xs[i]), ys[i])
        loss.backward(inputs=weights)
        torch.nn.utils.clip_grad_norm_(weights, 5.0)
        w_opt.step()
        return time.perf_counter() - t

    def arch_step(i: int) -> float:
        t = time.perf_counter()
        a_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xs[n + i]), ys[n + i])
        loss.backward(inputs=model.arch_parameters())
        a_opt.step()
        return time.perf_counter() - t

    times = {"weight": [], "arch": []}
    for i in range(n):   # interleaved as in the search: architecture step, then weight step
        ta = arch_step(i)
        tw = weight_step(i)
        if i >= warmup:
            times["arch"].append(ta)
            times["weight"].append(tw)
    rss_after = _maxrss_mb()
    return {
        "config": config, "impl": impl, "batch": cfg["batch"], "threads": threads,
        "times": times, "rss_before_mb": rss_before, "rss_peak_mb": rss_after, "rss_delta_mb": rss_after - rss_before,
    }


def run_child(config: str, impl: str, warmup: int, iters: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", config, impl,
           "--warmup", str(warmup), "--iters", str(iters), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick preset's configuration only")
    parser.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), help="configurations to run")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations per step (default 1, quick 2)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per step (default 3, quick 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        config, impl = args.child
        print(json.dumps(child(config, impl, args.warmup or 1, args.iters or 3, args.threads)))
        return

    configs = args.configs or (["quick"] if args.quick else ["darts", "quick"])
    rows = []
    for config in configs:
        warmup = args.warmup if args.warmup is not None else (2 if config == "quick" else 1)
        iters = args.iters if args.iters is not None else (5 if config == "quick" else 3)
        results = {}
        for impl in ("plain", "fast"):
            t0 = time.perf_counter()
            r = run_child(config, impl, warmup, iters, args.threads)
            results[impl] = r
            print(f"[{config}/{impl}] {time.perf_counter() - t0:.0f} s wall; "
                  f"weight step s: {' '.join(f'{t:.2f}' for t in r['times']['weight'])}; "
                  f"arch step s: {' '.join(f'{t:.2f}' for t in r['times']['arch'])}; "
                  f"peak RSS +{r['rss_delta_mb']:.0f} MB", flush=True)
        for impl, r in results.items():
            ips = {k: r["batch"] / statistics.median(v) for k, v in r["times"].items()}
            rows.append((config, impl, ips["weight"], ips["arch"], r["rss_delta_mb"], r["rss_peak_mb"]))
    print()
    cfg_text = {k: f"C={v['channels']}, {v['layers']} cells, batch {v['batch']}, {v['in_channels']}x{v['size']}x{v['size']}"
                for k, v in CONFIGS.items()}
    print(f"threads: {args.threads}; images/s from the median timed iteration; memory: peak RSS added by the steps")
    header = f"{'config':<7} {'network':<7} {'weight img/s':>12} {'arch img/s':>11} {'speed-up w/a':>13} {'peak +MB':>9} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    plain = {}
    for config, impl, w, a, delta, peak in rows:
        if impl == "plain":
            plain[config] = (w, a)
            speed = ""
        else:
            speed = f"{w / plain[config][0]:.1f}x/{a / plain[config][1]:.1f}x"
        print(f"{config:<7} {impl:<7} {w:>12.1f} {a:>11.1f} {speed:>13} {delta:>9.0f} {peak:>8.0f}")
    for config in configs:
        print(f"  {config}: {cfg_text[config]}")


if __name__ == "__main__":
    main()
