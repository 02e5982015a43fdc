"""FastEvalNetwork computes the same function as EvalNetwork, with the same parameters.

Exact equivalence is checked in float64, where the two differ only in the order of
floating-point sums: logits, auxiliary logits, the gradient of every parameter and the batch
norms' running statistics agree to ~1e-13 relative (we allow 1e-9 of the tensor's norm). Drop
path draws the plain network's random numbers in the plain network's order, so under the same
seed the two agree with drop path on as well; its distribution is checked separately. float32
(oneDNN, channels_last) is checked against a float64 reference: fast's error within 10x plain's
own float32 error plus 1e-5 of the tensor's norm.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nbutils.accel import channels_last_kernels
from nbutils.accel.fast_network import FastEvalNetwork, _drop_factors, accelerate, applies
from nbutils.space.genotype import Genotype, published
from nbutils.space.network import EvalNetwork

from equivalence import assert_same_gradients_and_buffers, random_batch, rel

#: convolutions only: no skip, no pool (and no "none", which genotypes refuse)
CONVS_ONLY = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_3x3", 0), ("sep_conv_3x3", 2),
            ("dil_conv_5x5", 1), ("sep_conv_3x3", 3), ("sep_conv_5x5", 2), ("dil_conv_3x3", 4)],
    reduce=[("sep_conv_5x5", 0), ("dil_conv_3x3", 1), ("dil_conv_5x5", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 2), ("dil_conv_3x3", 3), ("dil_conv_5x5", 1), ("sep_conv_5x5", 4)],
)
#: what the fast network shares or must not write in place: a node made of two identities, equal
#: pools of one state, a pool and a skip of one state, a cell input in the concatenation, an
#: output of three nodes
SHARING = Genotype(
    normal=[("skip_connect", 0), ("skip_connect", 1), ("avg_pool_3x3", 1), ("avg_pool_3x3", 1),
            ("max_pool_3x3", 2), ("skip_connect", 2), ("max_pool_3x3", 2), ("sep_conv_3x3", 0)],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 0), ("skip_connect", 1), ("avg_pool_3x3", 1),
            ("skip_connect", 1), ("skip_connect", 2), ("avg_pool_3x3", 0), ("dil_conv_5x5", 1)],
    normal_concat=(0, 2, 4, 5),   # (a reduction cell's inputs have the wrong size to be concatenated)
    reduce_concat=(2, 4, 5),
)
GENOTYPES = {"convs only": CONVS_ONLY, "sharing": SHARING, "PDARTS": published("PDARTS"),
             "DARTS_V1": published("DARTS_V1"), "DARTS_V2": published("DARTS_V2")}


def pair(genotype, dtype=torch.float64, **kw):
    """A plain and a fast network with identical parameters (the fast one built by accelerate)."""
    torch.manual_seed(0)
    plain = EvalNetwork(genotype, **kw)
    with torch.no_grad():   # BN affine parameters away from (1, 0), so that wrong ones show
        g = torch.Generator().manual_seed(1)
        for name, p in plain.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    fast = accelerate(EvalNetwork(genotype, **kw))
    fast.load_state_dict(plain.state_dict())
    return plain.to(dtype), fast.to(dtype)


def run(model, x, y, train=True, drop_path=0.0, seed=7):
    """One forward and backward: logits, auxiliary logits, gradients, buffers."""
    model.train(train)
    model.drop_path_prob = drop_path
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits, aux = model(x)
    loss = F.cross_entropy(logits, y) + (0.4 * F.cross_entropy(aux, y) if aux is not None else 0.0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return logits.detach(), (None if aux is None else aux.detach()), grads, buffers


def assert_same(fast_out, plain_out, tol=1e-9):
    (lf, af, gf, bf), (lp, ap, gp, bp) = fast_out, plain_out
    assert lf.shape == lp.shape and rel(lf, lp) < tol, rel(lf, lp)
    assert (af is None) == (ap is None)
    if ap is not None:
        assert af.shape == ap.shape and rel(af, ap) < tol, rel(af, ap)
    assert_same_gradients_and_buffers((gf, bf), (gp, bp), tol)


@pytest.fixture(params=[True, False], ids=["C kernels", "PyTorch kernels"])
def c_kernels(request, monkeypatch):
    """Both implementations of the batch norms: the C kernels and PyTorch's (no compiler)."""
    if not request.param:
        monkeypatch.setattr(channels_last_kernels, "available", lambda: False)
    return request.param


# --------------------------------------------------------------------------- same structure


def test_same_parameters_buffers_and_state_dict_both_ways():
    genotype = published("PDARTS")
    kw = dict(channels=4, layers=5, auxiliary=True, in_channels=3, input_size=16)
    torch.manual_seed(0)
    plain = EvalNetwork(genotype, **kw)
    torch.manual_seed(0)
    fast = FastEvalNetwork(genotype, **kw)   # the same constructor: the same initial weights
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert [n for n, _ in fast.named_buffers()] == [n for n, _ in plain.named_buffers()]
    for (n, a), b in zip(plain.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), n
    other = EvalNetwork(genotype, **kw)
    other.load_state_dict(fast.state_dict())
    fast.load_state_dict(other.state_dict())


def test_accelerate_shares_the_networks_modules():
    plain = EvalNetwork(published("DARTS_V2"), channels=4, layers=3, auxiliary=True, in_channels=1, input_size=8)
    plain.drop_path_prob = 0.2
    fast = accelerate(plain)
    assert isinstance(fast, FastEvalNetwork) and fast is not plain and applies(plain)
    assert all(a is b for a, b in zip(fast.parameters(), plain.parameters()))
    assert all(a is b for a, b in zip(fast.buffers(), plain.buffers()))
    assert fast.drop_path_prob == 0.2 and accelerate(fast) is fast
    fast.extra = torch.nn.Linear(1, 1)   # registering on one does not register on the other
    assert not hasattr(plain, "extra")


def test_accelerate_falls_back_where_it_does_not_apply():
    half = EvalNetwork(published("DARTS_V2"), channels=4, layers=3, in_channels=1, input_size=8).half()
    assert not applies(half) and accelerate(half) is half
    not_eval = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert not applies(not_eval) and accelerate(not_eval) is not_eval


# --------------------------------------------------------------------------- same function (float64)

CASES = {
    "convs only, 3x16x16, aux": dict(genotype="convs only", kw=dict(channels=4, layers=5, auxiliary=True), x=(4, 3, 16)),
    "sharing, 1x16x16, aux": dict(genotype="sharing", kw=dict(channels=4, layers=5, auxiliary=True, in_channels=1),
                                  x=(4, 1, 16)),
    "PDARTS, 1x28x28 (odd 7x7 maps), no aux": dict(genotype="PDARTS", kw=dict(channels=4, layers=4, in_channels=1,
                                                                              input_size=28), x=(3, 1, 28)),
    "PDARTS, 3x32x32 (aux pools 5x5)": dict(genotype="PDARTS", kw=dict(channels=4, layers=3, auxiliary=True),
                                            x=(3, 3, 32)),
    "DARTS_V1, 3 cells (aux on the last cell)": dict(genotype="DARTS_V1", kw=dict(channels=4, layers=3, auxiliary=True,
                                                                                  input_size=8), x=(4, 3, 8)),
    "DARTS_V2, 1x14x14, aux": dict(genotype="DARTS_V2", kw=dict(channels=4, layers=6, auxiliary=True, in_channels=1,
                                                                input_size=14), x=(4, 1, 14)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_outputs_gradients_and_running_stats_float64(name, c_kernels):
    case = CASES[name]
    kw = dict(case["kw"])
    kw.setdefault("input_size", case["x"][2])
    kw["in_channels"] = case["x"][1]
    plain, fast = pair(GENOTYPES[case["genotype"]], **kw)
    x, y = random_batch(*case["x"])
    assert_same(run(fast, x, y), run(plain, x, y))
    # drop path on: the same samples dropped under the same seed
    assert_same(run(fast, x, y, drop_path=0.3), run(plain, x, y, drop_path=0.3))
    # eval mode, from the running statistics the two steps left (no aux, no drop path)
    assert_same(run(fast, x, y, train=False, drop_path=0.3), run(plain, x, y, train=False, drop_path=0.3))


def test_training_steps_match_plain():
    """A few SGD steps (momentum, weight decay, clipping, drop path): the weights stay equal."""
    plain, fast = pair(published("PDARTS"), channels=4, layers=5, auxiliary=True, in_channels=1, input_size=16)
    optimisers = [torch.optim.SGD(m.parameters(), 0.05, momentum=0.9, weight_decay=3e-4) for m in (plain, fast)]
    for step in range(2):
        x, y = random_batch(4, 1, 16, seed=step)
        for model, opt in zip((plain, fast), optimisers):
            opt.zero_grad(set_to_none=True)
            run(model, x, y, drop_path=0.2, seed=step)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
    for (n, a), b in zip(plain.state_dict().items(), fast.state_dict().values()):
        assert rel(b, a) < 1e-9 if a.is_floating_point() else torch.equal(a, b), n


# --------------------------------------------------------------------------- drop path


def test_drop_path_factors_have_the_plain_distribution():
    """Per operation that is not an identity, a factor per sample: 0 with probability p, else
    1 / (1 - p); identities and p = 0 get none."""
    net = EvalNetwork(SHARING, channels=4, layers=3, in_channels=1, input_size=8)
    cell = net.cells[0]
    like = torch.zeros(4000, 4, 2, 2)
    assert _drop_factors(cell, like, 0.0) == [None] * len(cell.ops)
    p = 0.3
    factors = _drop_factors(cell, like, p)
    identities = [type(op).__name__ == "Identity" for op in cell.ops]
    assert [f is None for f in factors] == identities and sum(identities) == 3
    values = torch.cat([f.flatten() for f in factors if f is not None])
    kept = values[values != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-12, atol=0)
    dropped = (values == 0).double().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / values.numel()) ** 0.5   # 4 standard deviations
    # independent across operations: the factors of two operations are uncorrelated
    a, b = [f.flatten() == 0 for f in factors if f is not None][:2]
    both = (a & b).double().mean().item()
    assert abs(both - p * p) < 4 * (p * p * (1 - p * p) / a.numel()) ** 0.5


def test_drop_path_acts_in_training_only():
    plain, fast = pair(published("DARTS_V2"), channels=4, layers=3, in_channels=1, input_size=8)
    x, y = random_batch(8, 1, 8)
    with_drop = run(fast, x, y, drop_path=0.5, seed=1)[0]
    assert rel(with_drop, run(fast, x, y, drop_path=0.0)[0]) > 1e-3
    assert rel(with_drop, run(fast, x, y, drop_path=0.5, seed=2)[0]) > 1e-3   # its own draws per seed
    fast.eval()
    fast.drop_path_prob = 0.5
    with torch.no_grad():
        assert torch.equal(fast(x)[0], fast(x)[0]) and fast(x)[1] is None


# --------------------------------------------------------------------------- float32


def test_float32_as_accurate_as_plain():
    genotype = published("PDARTS")
    kw = dict(channels=4, layers=5, auxiliary=True, in_channels=1, input_size=16)
    reference, _ = pair(genotype, torch.float64, **kw)
    plain, fast = pair(genotype, torch.float32, **kw)
    x, y = random_batch(8, 1, 16)
    ref = run(reference, x, y, drop_path=0.2)
    outs = {name: run(m, x.float(), y, drop_path=0.2) for name, m in (("plain", plain), ("fast", fast))}
    for i in (0, 1):
        assert rel(outs["fast"][i], ref[i]) < 10 * rel(outs["plain"][i], ref[i]) + 1e-5
    for kind in (2, 3):
        for n, r in ref[kind].items():
            if n.endswith("num_batches_tracked"):
                continue
            err_fast, err_plain = rel(outs["fast"][kind][n], r), rel(outs["plain"][kind][n], r)
            assert err_fast < 10 * err_plain + 1e-5, (n, err_fast, err_plain)
