"""Training throughput of the plain ``EvalNetwork`` against ``FastEvalNetwork`` (retraining).

    python benchmarks/retrain_speed.py                    # quick and mnist configurations, 1 and 2 threads
    python benchmarks/retrain_speed.py --configs paper    # the paper's network (minutes per child)
    python benchmarks/retrain_speed.py --configs quick --profile   # where the fast network's time goes

Configurations (``CONFIGS``):

* ``quick``: the quick preset's retraining, C=12, 5 cells, batch 64, 1x16x16 inputs, 10 classes,
  auxiliary head, drop path 0.1;
* ``mnist``: C=16, 8 cells, batch 64, 1x28x28 inputs, auxiliary head, drop path 0.1;
* ``paper``: the papers' retraining, C=36, 20 cells, batch 128, 3x32x32 inputs, auxiliary head,
  drop path 0.3 (a few steps only).

Three networks, the same genotype (``--genotypes``, each measured separately):

* ``plain``: ``EvalNetwork``, NCHW (what retraining runs by default);
* ``plain_cl``: ``EvalNetwork`` with channels_last parameters and inputs
  (``RetrainConfig.channels_last``);
* ``fast``: ``accelerate(EvalNetwork(...))`` (:mod:`nbutils.accel.fast_network`).

One step is what :func:`nbutils.training.loop.train_supervised` does per batch: zero the
gradients, forward, cross-entropy plus 0.4 times the auxiliary cross-entropy, backward, clip the
gradient norm to 5, SGD (momentum 0.9, weight decay 3e-4). All networks start from the same
parameters and see the same random batches.

As in ``benchmarks/supernet_speed.py``, each network runs in fresh child processes (this
script with ``--child``), which alternate (plain, plain_cl, fast, then reversed, ... for
``--rounds``), so that the ratios come from one run under the same load; the children keep
freed memory (:mod:`nbutils.core.malloc`). Throughput is images per second from the median
timed step (warm-up steps excluded), by the wall clock and by the process's CPU time
(``time.process_time``); on a shared machine the CPU time is less disturbed by other load (it
excludes the time the process waits for a core, not the caches others evict). A second table
gives the speed-ups from each network's fastest step.

``--profile`` instead runs the fast and the plain network in this process and prints, per
operator, the smallest self time over the profiled steps (the least disturbed by other load),
summed over the step's calls: where the time goes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "quick": dict(channels=12, layers=5, batch=64, in_channels=1, size=16, num_classes=10, drop_path=0.1,
                  warmup=3, iters=10),
    "mnist": dict(channels=16, layers=8, batch=64, in_channels=1, size=28, num_classes=10, drop_path=0.1,
                  warmup=2, iters=5),
    "paper": dict(channels=36, layers=20, batch=128, in_channels=3, size=32, num_classes=10, drop_path=0.3,
                  warmup=1, iters=2),
}
IMPLS = ("plain", "plain_cl", "fast")


class _Bench:
    """One network with its optimiser and batches, and its timed training step."""

    def __init__(self, config: str, impl: str, genotype: str, n: int):
        import torch
        import torch.nn.functional as F

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from nbutils.accel.fast_network import accelerate
        from nbutils.space.genotype import published
        from nbutils.space.network import EvalNetwork

        self.torch, self.F = torch, F
        cfg = CONFIGS[config]
        torch.manual_seed(0)
        model = EvalNetwork(published(genotype), channels=cfg["channels"], num_classes=cfg["num_classes"],
                            layers=cfg["layers"], auxiliary=True, in_channels=cfg["in_channels"],
                            input_size=cfg["size"])
        self.layout = torch.channels_last if impl == "plain_cl" else torch.contiguous_format
        if impl == "plain_cl":
            model = model.to(memory_format=torch.channels_last)
        if impl == "fast":
            model = accelerate(model)
        model.train()
        model.drop_path_prob = cfg["drop_path"]
        self.model = model
        self.optimiser = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9, weight_decay=3e-4)
        g = torch.Generator().manual_seed(1)
        shape = (cfg["batch"], cfg["in_channels"], cfg["size"], cfg["size"])
        self.xs = [torch.randn(shape, generator=g) for _ in range(n)]
        self.ys = [torch.randint(0, cfg["num_classes"], (cfg["batch"],), generator=g) for _ in range(n)]

    def step(self, i: int) -> tuple[float, float]:
        """One training step on batch ``i``: (wall seconds, CPU seconds)."""
        wall, cpu = time.perf_counter(), time.process_time()
        x = self.xs[i].contiguous(memory_format=self.layout)
        self.optimiser.zero_grad(set_to_none=True)
        logits, aux = self.model(x)
        loss = self.F.cross_entropy(logits, self.ys[i]) + 0.4 * self.F.cross_entropy(aux, self.ys[i])
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimiser.step()
        return time.perf_counter() - wall, time.process_time() - cpu


def child(config: str, impl: str, genotype: str, warmup: int, iters: int, threads: int) -> dict:
    """Seconds per step (wall and CPU), in a fresh process."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nbutils.core.malloc import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(threads)
    b = _Bench(config, impl, genotype, warmup + iters)
    wall, cpu = [], []
    for i in range(warmup + iters):
        w, c = b.step(i)
        if i >= warmup:
            wall.append(w)
            cpu.append(c)
    return {"wall": wall, "cpu": cpu}


def run_child(config: str, impl: str, genotype: str, warmup: int, iters: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", config, impl, genotype,
           "--warmup", str(warmup), "--iters", str(iters), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile(config: str, genotype: str, threads: int, steps: int, rows: int) -> None:
    """Per operator, the smallest self time over ``steps`` profiled steps, for fast and plain."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nbutils.core.malloc import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(threads)
    for impl in ("fast", "plain"):
        b = _Bench(config, impl, genotype, steps + 3)
        for i in range(3):
            b.step(i)
        best: dict[str, float] = {}
        calls: dict[str, int] = {}
        for i in range(steps):
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                b.step(3 + i)
            for event in prof.key_averages():
                best[event.key] = min(best.get(event.key, float("inf")), event.self_cpu_time_total / 1e3)
                calls[event.key] = event.count
        total = sum(best.values())
        print(f"\n{impl}: {config}, {genotype}, {threads} thread(s); per operator the smallest self time over "
              f"{steps} steps (ms per step); sum {total:.1f} ms")
        for key, ms in sorted(best.items(), key=lambda kv: -kv[1])[:rows]:
            print(f"  {ms:8.2f} ms {100 * ms / total:5.1f}%  {calls[key]:5d} calls  {key[:70]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), default=["quick", "mnist"])
    parser.add_argument("--genotypes", nargs="*", default=["DARTS_V2", "PDARTS"],
                        help="published genotypes (nbutils.space.genotype.PUBLISHED)")
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per child (default: per config)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per child (default: per config)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the three networks")
    parser.add_argument("--profile", action="store_true", help="operator breakdown instead of the timing")
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "IMPL", "GENOTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, least in (("warmup", 0), ("iters", 1), ("rounds", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name} must be at least {least}, got {value}")
    if any(t < 1 for t in args.threads):
        parser.error("--threads must be at least 1")

    if args.child:
        config, impl, genotype = args.child
        cfg = CONFIGS[config]
        warmup = cfg["warmup"] if args.warmup is None else args.warmup
        print(json.dumps(child(config, impl, genotype, warmup, args.iters or cfg["iters"], args.threads[0])))
        return
    if args.profile:
        for config in args.configs:
            for genotype in args.genotypes:
                for threads in args.threads:
                    profile(config, genotype, threads, args.iters or 8, 30)
        return

    results = []
    for config in args.configs:
        cfg = CONFIGS[config]
        warmup = cfg["warmup"] if args.warmup is None else args.warmup
        iters = args.iters or cfg["iters"]
        for genotype in args.genotypes:
            for threads in args.threads:
                times = {impl: {"wall": [], "cpu": []} for impl in IMPLS}
                for r in range(args.rounds):
                    for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
                        t0 = time.perf_counter()
                        out = run_child(config, impl, genotype, warmup, iters, threads)
                        for kind in times[impl]:
                            times[impl][kind] += out[kind]
                        print(f"[{config}/{genotype}/{threads}t/{impl}, round {r + 1}] "
                              f"{time.perf_counter() - t0:.0f} s wall; step s: "
                              f"{' '.join(f'{v:.3f}' for v in out['wall'])}", flush=True)
                results.append((config, genotype, threads, times))

    print("\nimages/s from the median timed step (wall clock | CPU time), speed-ups over plain and plain_cl")
    header = (f"{'config':<6} {'genotype':<9} {'thr':>3} {'plain':>13} {'plain_cl':>13} {'fast':>13} "
              f"{'fast/plain':>12} {'fast/cl':>11}")
    print(header)
    print("-" * len(header))
    for config, genotype, threads, times in results:
        batch = CONFIGS[config]["batch"]
        ips = {impl: {kind: batch / statistics.median(v) for kind, v in t.items()} for impl, t in times.items()}
        cells = " ".join(f"{ips[i]['wall']:>6.0f}|{ips[i]['cpu']:<6.0f}" for i in IMPLS)
        vs_plain = f"{ips['fast']['wall'] / ips['plain']['wall']:.2f}|{ips['fast']['cpu'] / ips['plain']['cpu']:.2f}"
        vs_cl = f"{ips['fast']['wall'] / ips['plain_cl']['wall']:.2f}|{ips['fast']['cpu'] / ips['plain_cl']['cpu']:.2f}"
        print(f"{config:<6} {genotype:<9} {threads:>3} {cells} {vs_plain:>12} {vs_cl:>11}")
    print("\nspeed-ups from each network's fastest step (wall clock | CPU time)")
    print(f"{'config':<6} {'genotype':<9} {'thr':>3} {'fast/plain':>12} {'fast/cl':>11}")
    for config, genotype, threads, times in results:
        best = {impl: {kind: min(v) for kind, v in t.items()} for impl, t in times.items()}
        vs_plain = f"{best['plain']['wall'] / best['fast']['wall']:.2f}|{best['plain']['cpu'] / best['fast']['cpu']:.2f}"
        vs_cl = f"{best['plain_cl']['wall'] / best['fast']['wall']:.2f}|{best['plain_cl']['cpu'] / best['fast']['cpu']:.2f}"
        print(f"{config:<6} {genotype:<9} {threads:>3} {vs_plain:>12} {vs_cl:>11}")
    for config in sorted({r[0] for r in results}):
        c = CONFIGS[config]
        print(f"  {config}: C={c['channels']}, {c['layers']} cells, batch {c['batch']}, "
              f"{c['in_channels']}x{c['size']}x{c['size']}, auxiliary, drop path {c['drop_path']}")


if __name__ == "__main__":
    main()
