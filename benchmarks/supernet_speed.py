"""Throughput and peak memory of the plain ``SuperNet`` against ``FastSuperNet``.

    python benchmarks/supernet_speed.py            # both configurations (several minutes)
    python benchmarks/supernet_speed.py --quick    # the quick preset's configuration only
    python benchmarks/supernet_speed.py --quick --without c_kernels polyphase   # plain against fast without pieces
    python benchmarks/supernet_speed.py --quick --without matmul_pointwise --baseline without   # a piece's own gain
    python benchmarks/supernet_speed.py --quick --threads 1 --clock cpu   # steadier on a loaded machine

Two configurations:

* ``darts``: DARTS' search setting, C=16, 8 cells, batch 64, 3x32x32 inputs, 10 classes;
* ``quick``: the quick preset's search, C=8, 5 cells, batch 32, 1x16x16 inputs, 10 classes.

Two steps, as ``nbutils.nas.darts.darts_search`` runs them:

* weight step: forward, cross-entropy, backward w.r.t. the weights, gradient clipping, SGD
  (momentum 0.9, weight decay 3e-4);
* architecture step: forward, cross-entropy, backward w.r.t. the two alphas, Adam.

Throughput is images per second, from the median time of the timed iterations (warm-up
iterations, which create oneDNN primitives and grow the heap, are excluded). A second table
gives the speed-ups from each network's fastest iteration, the figure least disturbed by
other load on a shared machine (as ``timeit`` advises), next to the medians' speed-ups.
Both networks start from the same parameters and see the same random batches.
``torch.set_num_threads(2)``.

Each network runs in fresh child processes (this script with ``--child``), so that neither
inherits the other's heap (in one process, the plain network's freed activations slowed the
fast network's next steps). The load of a shared machine drifts over minutes, so the children
alternate, plain, fast, fast, plain, ... (``--rounds`` pairs), and each network's median is
taken over all its timed iterations. Results: ``benchmarks/README.md``.

Both networks' processes keep freed memory for their next tensors (:mod:`nbutils.core.malloc`, as
the runner's notebook kernels do); ``--malloc default`` measures glibc's defaults instead, where
each step faults its large tensors in again (the fast network loses more to that).

``--without PIECE ...`` measures ``FastSuperNet`` with some of its pieces replaced by the
plain computation (an A/B of one piece: run with and without it). The pieces are patched into
the modules FastSuperNet is built from (:data:`MODULES`: every binding of the patched name) in
the fast network's child processes only (see :data:`PIECES`); the production code has no such
switch. Each patch computes the same function.

Peak memory: PyTorch's CPU allocations are invisible to ``tracemalloc``, so each child reads
its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) once the model,
optimisers and data exist, and again after all steps: the difference is the peak memory the
steps added (activations kept for backward, gradients, optimiser state). The numbers include
allocator slack and are a few MB coarse; the largest over the rounds is shown.

The script prints every iteration's time as well as the median.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "darts": dict(channels=16, layers=8, batch=64, in_channels=3, size=32, num_classes=10),
    "quick": dict(channels=8, layers=5, batch=32, in_channels=1, size=16, num_classes=10),
}
IMPLS = ("plain", "fast")
#: the modules FastSuperNet is built from, which ``--without`` patches
MODULES = ("nbutils.accel.channels_last", "nbutils.accel.depthwise", "nbutils.accel.batch_norm",
           "nbutils.accel.operations", "nbutils.accel.fast_supernet")
#: the pieces of FastSuperNet that ``--without`` can replace by the plain computation
PIECES = {
    "c_kernels": "batch norm, the scaled adds' backward, the depthwise convolutions and the running statistics on "
                 "PyTorch's kernels instead of the C kernels",
    "c_depthwise": "depthwise convolutions on oneDNN (with the hand-written backward) instead of the C kernels",
    "custom_dw": "depthwise convolutions with oneDNN's own backward (no DepthwiseConv, no DepthwiseFanout)",
    "polyphase": "the weight gradient of a dilation-2 kernel computed directly, not on the polyphase sub-images",
    "split5x5": "the weight gradient of a 5x5 kernel computed directly, not as four 3x3 ones",
    "flip_input_grad": "the input gradient of a stride-1 depthwise convolution as a transposed convolution",
    "channels_last": "NCHW activations (the centring for PyTorch's batch norm then runs on them too)",
    "matmul_pointwise": "1x1 convolutions by oneDNN instead of matrix products of the channels_last pixels",
    "mixed_convs": "the separable and dilated convolutions that read one state each on its own, not as one fused "
                   "node of stacked tensors (every piece above but c_kernels and channels_last also turns the fused "
                   "node off: it computes them its own way)",
}
#: the pieces the fused node of nbutils.accel.mixed_convs replaces by its own computation
_FUSED_NODE_BYPASSES = {"c_depthwise", "custom_dw", "polyphase", "split5x5", "flip_input_grad", "matmul_pointwise",
                        "mixed_convs"}


def _patch(name: str, value) -> None:
    """Bind ``name`` to ``value`` in every module of :data:`MODULES` that binds it (those that
    import it by name hold their own binding)."""
    for module in (importlib.import_module(m) for m in MODULES):
        if hasattr(module, name):
            setattr(module, name, value)


def _without(pieces: list[str]) -> None:
    """Patch the modules of :data:`MODULES` in this process: ``pieces`` (of :data:`PIECES`)
    replaced by the plain computation."""
    import torch
    import torch.nn.functional as F

    from nbutils.accel import channels_last_kernels, depthwise

    if _FUSED_NODE_BYPASSES & set(pieces):
        _patch("mixed_convs", lambda inputs, convs, stats: None)   # "does not apply": each convolution on its own
    if "c_kernels" in pieces:   # the production switch for machines without a C compiler
        os.environ["NBUTILS_NO_C_KERNELS"] = "1"
        channels_last_kernels._library.cache_clear()
    if "c_depthwise" in pieces:
        channels_last_kernels.depthwise_applies = lambda x, w: False
    if "channels_last" in pieces:
        # layout() then never reports channels_last, and forward() leaves the input NCHW
        _patch("CHANNELS_LAST", torch.contiguous_format)
    if "flip_input_grad" in pieces:
        def input_grad(grad, w, x_shape, stride, padding, dilation):
            c, k = w.shape[0], w.shape[-1]
            extra = [x_shape[i] - ((grad.shape[i] - 1) * stride - 2 * padding + dilation * (k - 1) + 1) for i in (2, 3)]
            return F.conv_transpose2d(grad, w, None, stride, padding, extra, c, dilation)
        _patch("depthwise_input_grad", input_grad)
    if "polyphase" in pieces:
        direct = depthwise.weight_grad

        def weight_grad(x, grad, k, stride, padding, dilation, use_polyphase=True):
            return direct(x, grad, k, stride, padding, dilation, False)
        _patch("weight_grad", weight_grad)
    if "split5x5" in pieces:
        split = depthwise.weight_grad

        def weight_grad_5x5(x, grad, k, stride, padding, dilation, use_polyphase=True):
            if k == 5 and dilation == 1:
                probe = grad.new_empty(x.x.shape[1], 1, k, k)
                return depthwise.native_grads(grad, x.x, probe, stride, padding, dilation, [False, True, False])[1]
            return split(x, grad, k, stride, padding, dilation, use_polyphase)
        _patch("weight_grad", weight_grad_5x5)
    if "matmul_pointwise" in pieces:
        def pointwise(x, weight, bias=None):
            return F.conv2d(x, weight, bias)
        _patch("pointwise", pointwise)
    if "custom_dw" in pieces:
        def depthwise_conv2d(x, w, stride=1, padding=0, dilation=1, polyphase=True):
            return F.conv2d(x, w, None, stride, padding, dilation, x.shape[1])

        def fanout(x, convs, on_even=False):
            if on_even:   # x holds the even pixels: stride-1 undilated convolutions of them
                return [depthwise_conv2d(x, c.weight, 1, c.padding[0] // 2, 1) for c in convs]
            return [depthwise_conv2d(x, c.weight, c.stride[0], c.padding[0], c.dilation[0]) for c in convs]
        _patch("depthwise_conv2d", depthwise_conv2d)
        _patch("depthwise_fanout", fanout)


def _maxrss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: kilobytes


class _Bench:
    """One network with its optimisers and batches, and its two timed steps."""

    def __init__(self, config: str, impl: str, n: int, clock: str = "wall"):
        import torch
        import torch.nn.functional as F

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from nbutils.accel.fast_supernet import FastSuperNet
        from nbutils.space.supernet import SuperNet

        self.torch, self.F = torch, F
        self.clock = time.perf_counter if clock == "wall" else time.process_time
        cfg = CONFIGS[config]
        cls = FastSuperNet if impl == "fast" else SuperNet
        torch.manual_seed(0)
        self.model = cls(channels=cfg["channels"], num_classes=cfg["num_classes"], layers=cfg["layers"],
                         in_channels=cfg["in_channels"], seed=0)
        self.model.train()
        self.weights = list(self.model.weights())
        self.w_opt = torch.optim.SGD(self.weights, 0.025, momentum=0.9, weight_decay=3e-4)
        self.a_opt = torch.optim.Adam(self.model.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
        g = torch.Generator().manual_seed(1)
        shape = (cfg["batch"], cfg["in_channels"], cfg["size"], cfg["size"])
        self.n = n
        self.xs = [torch.randn(shape, generator=g) for _ in range(2 * n)]
        self.ys = [torch.randint(0, cfg["num_classes"], (cfg["batch"],), generator=g) for _ in range(2 * n)]

    def weight_step(self, i: int) -> float:
        t = self.clock()
        self.w_opt.zero_grad(set_to_none=True)
        loss = self.F.cross_entropy(self.model(self.xs[i]), self.ys[i])
        loss.backward(inputs=self.weights)
        self.torch.nn.utils.clip_grad_norm_(self.weights, 5.0)
        self.w_opt.step()
        return self.clock() - t

    def arch_step(self, i: int) -> float:
        t = self.clock()
        self.a_opt.zero_grad(set_to_none=True)
        loss = self.F.cross_entropy(self.model(self.xs[self.n + i]), self.ys[self.n + i])
        loss.backward(inputs=self.model.arch_parameters())
        self.a_opt.step()
        return self.clock() - t


def child(config: str, impl: str, warmup: int, iters: int, threads: int, malloc: str,
          without: list[str] = (), clock: str = "wall") -> dict:
    """Seconds per step and the peak memory the steps add, in a fresh process."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if impl == "fast" and without:
        _without(list(without))

    if malloc == "keep":
        from nbutils.core.malloc import keep_freed_memory
        if not keep_freed_memory():
            raise SystemExit("--malloc keep needs glibc; use --malloc default")
    torch.set_num_threads(threads)
    b = _Bench(config, impl, warmup + iters, clock)
    rss_before = _maxrss_mb()
    times = {"weight": [], "arch": []}
    for i in range(warmup + iters):   # as in the search: architecture step, then weight step
        ta = b.arch_step(i)
        tw = b.weight_step(i)
        if i >= warmup:
            times["arch"].append(ta)
            times["weight"].append(tw)
    rss_after = _maxrss_mb()
    return {"times": times, "rss_peak_mb": rss_after, "rss_delta_mb": rss_after - rss_before}


def run_child(config: str, impl: str, warmup: int, iters: int, threads: int, malloc: str,
              without: list[str] = (), clock: str = "wall") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", config, impl, "--clock", clock,
           "--warmup", str(warmup), "--iters", str(iters), "--threads", str(threads), "--malloc", malloc]
    if "," in config:   # a --size configuration
        cmd += ["--size", config]
    if without:
        cmd += ["--without", *without]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick preset's configuration only")
    parser.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), help="configurations to run")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations per child (default 1, quick 2)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per child (default 3, quick 5)")
    parser.add_argument("--rounds", type=int, default=2, help="plain/fast child pairs, alternating (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep freed memory in the process (nbutils.core.malloc, default) or glibc's defaults")
    parser.add_argument("--without", nargs="+", default=[], choices=sorted(PIECES), metavar="PIECE",
                        help="run FastSuperNet with these pieces replaced by the plain computation: "
                             + "; ".join(f"{k}: {v}" for k, v in PIECES.items()))
    parser.add_argument("--baseline", choices=("plain", "without"), default="plain",
                        help="what the fast network is compared with: the plain SuperNet (default), or, with "
                             "--without, FastSuperNet without those pieces (an A/B of the pieces, side by side)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (default), or the process's CPU time, steadier on a machine loaded by "
                             "other work (with --threads 1 it is the step's own compute)")
    parser.add_argument("--size", action="append", default=[], metavar="C,CELLS,BATCH,PIXELS",
                        help="a configuration of one-channel images, e.g. 8,5,32,12 (repeatable; runs these only)")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for text in args.size:
        try:
            channels, layers, batch, size = (int(v) for v in text.split(","))
        except ValueError:
            parser.error(f"--size takes C,CELLS,BATCH,PIXELS, e.g. 8,5,32,12; got {text!r}")
        CONFIGS[text] = dict(channels=channels, layers=layers, batch=batch, in_channels=1, size=size, num_classes=10)
    for name, least in (("warmup", 0), ("iters", 1), ("rounds", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name} must be at least {least}, got {value}")

    if args.child:
        config, impl = args.child
        warmup = 1 if args.warmup is None else args.warmup
        print(json.dumps(child(config, impl, warmup, args.iters or 3, args.threads, args.malloc, args.without,
                               args.clock)))
        return
    if args.baseline == "without" and not args.without:
        parser.error("--baseline without needs --without PIECE ...")
    # (network, pieces left out) per name: the baseline is "plain" in the tables either way
    runs = ({"plain": ("plain", []), "fast": ("fast", args.without)} if args.baseline == "plain" else
            {"plain": ("fast", args.without), "fast": ("fast", [])})

    configs = args.size or args.configs or (["quick"] if args.quick else ["darts", "quick"])
    rows = []
    fastest = {}
    for config in configs:
        warmup = args.warmup if args.warmup is not None else (2 if config == "quick" else 1)
        iters = args.iters if args.iters is not None else (5 if config == "quick" else 3)
        times = {impl: {"weight": [], "arch": []} for impl in IMPLS}
        memory = {impl: [] for impl in IMPLS}
        for r in range(args.rounds):
            for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
                t0 = time.perf_counter()
                network, left_out = runs[impl]
                out = run_child(config, network, warmup, iters, args.threads, args.malloc, left_out, args.clock)
                for kind in times[impl]:
                    times[impl][kind] += out["times"][kind]
                memory[impl].append((out["rss_delta_mb"], out["rss_peak_mb"]))
                print(f"[{config}/{impl}, round {r + 1}] {time.perf_counter() - t0:.0f} s wall; "
                      f"weight step s: {' '.join(f'{v:.2f}' for v in out['times']['weight'])}; "
                      f"arch step s: {' '.join(f'{v:.2f}' for v in out['times']['arch'])}; "
                      f"peak RSS +{out['rss_delta_mb']:.0f} MB", flush=True)
        for impl in IMPLS:
            fastest[config, impl] = {k: min(v) for k, v in times[impl].items()}
            ips = {k: CONFIGS[config]["batch"] / statistics.median(v) for k, v in times[impl].items()}
            delta, peak = max(memory[impl])
            rows.append((config, impl, ips["weight"], ips["arch"], delta, peak))
    print()
    cfg_text = {k: f"C={v['channels']}, {v['layers']} cells, batch {v['batch']}, {v['in_channels']}x{v['size']}x{v['size']}"
                for k, v in CONFIGS.items()}
    if args.without and args.baseline == "plain":
        print(f"fast network without: {', '.join(args.without)}")
    elif args.without:
        print(f"baseline ('plain' below): the fast network without {', '.join(args.without)}")
    print(f"clock: {args.clock}")
    print(f"threads: {args.threads}; malloc: {args.malloc}; images/s from the median timed iteration over {args.rounds} alternating child pairs; "
          "memory: peak RSS added by the steps")
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
    print()
    print("fastest iteration, seconds per step, and the speed-ups from it and from the medians")
    header = f"{'config':<7} {'plain w/a':>11} {'fast w/a':>11} {'speed-up w/a':>13} {'(medians)':>10}"
    print(header)
    print("-" * len(header))
    medians = {(config, impl): (w, a) for config, impl, w, a, *_ in rows}
    for config in configs:
        p, f = fastest[config, "plain"], fastest[config, "fast"]
        (pw, pa), (fw, fa) = medians[config, "plain"], medians[config, "fast"]
        print(f"{config:<7} {p['weight']:>5.2f}/{p['arch']:<5.2f} {f['weight']:>5.2f}/{f['arch']:<5.2f} "
              f"{p['weight'] / f['weight']:>7.1f}x/{p['arch'] / f['arch']:.1f}x {fw / pw:>5.1f}x/{fa / pa:.1f}x")


if __name__ == "__main__":
    main()
