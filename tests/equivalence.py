"""Shared checks of the fast networks against the plain ones they accelerate
(``test_fast_supernet.py``, ``test_fast_network.py``): one random batch, one relative
difference, one comparison of gradients and buffers."""
from __future__ import annotations

import torch


def random_batch(n: int, channels: int, size: int, dtype=torch.float64, seed: int = 0, classes: int = 10):
    """``n`` Gaussian images of ``channels`` x ``size`` x ``size`` and uniform labels, seeded."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, channels, size, size, generator=g).to(dtype),
            torch.randint(0, classes, (n,), generator=g))


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """Norm-wise relative difference of ``a`` from ``b``; a ``b`` whose norm is below ``floor``
    per element counts as noise around 0 (e.g. the running mean of an already centred input)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(max(floor * b.numel() ** 0.5, 1e-12))).item()


def assert_same_gradients_and_buffers(fast: tuple[dict, dict], plain: tuple[dict, dict], tol: float,
                                      floor: float = 0.0) -> None:
    """Both models' ``(gradients, buffers)`` by name: the same names, every tensor within
    ``tol`` (:func:`rel`), batch counters exactly equal."""
    (gf, bf), (gp, bp) = fast, plain
    assert gf.keys() == gp.keys()
    bad = {n: rel(gf[n], gp[n], floor) for n in gp if rel(gf[n], gp[n], floor) > tol}
    assert not bad, sorted(bad.items(), key=lambda kv: -kv[1])[:5]
    assert bf.keys() == bp.keys()
    for n in bp:
        if n.endswith("num_batches_tracked"):
            assert torch.equal(bf[n], bp[n]), n
        else:
            assert rel(bf[n], bp[n], floor) < tol, (n, rel(bf[n], bp[n], floor))
