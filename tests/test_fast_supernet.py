"""FastSuperNet computes the same function as SuperNet, with the same parameters.

Tolerances. Exact equivalence is checked in float64: fast and plain differ only in the order
of floating-point sums, so logits, every weight and alpha gradient and the BN running
statistics agree to ~1e-12 relative (we allow 1e-9 of the tensor's norm). float64 runs
PyTorch's reference convolution kernels, not oneDNN, so the float32 paths (channels_last,
oneDNN) are checked separately against a float64 reference: per tensor, fast's float32 error
must be within 10x plain's own float32 error (plus 1e-5 of the tensor's norm). A fixed
float32 tolerance would be wrong either way: the BN layers without affine parameters make
some weight gradients ill-conditioned (a gradient that is a small difference of large
terms), where plain float32 itself is only ~1e-2 accurate relative to the tensor's maximum.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbutils.accel import batch_norm as accel_batch_norm
from nbutils.accel import channels_last_kernels, fast_supernet, operations
from nbutils.accel.batch_norm import PointwiseBatchNorm
from nbutils.accel.channels_last import EvenOdd
from nbutils.accel.depthwise import depthwise_conv2d
from nbutils.accel.fast_supernet import FastSuperNet
from nbutils.accel.operations import pool as pool_op
from nbutils.space.genotype import NUM_EDGES
from nbutils.space.ops import PRIMITIVES
from nbutils.space.supernet import SuperNet

from equivalence import assert_same_gradients_and_buffers, random_batch
from equivalence import rel as relative_difference


def pair(dtype=torch.float64, **kw):
    """A plain and a fast network with identical parameters, alpha spread out (N(0, 1))."""
    kw.setdefault("seed", 3)
    torch.manual_seed(0)
    plain = SuperNet(**kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for a in plain.arch_parameters():
            a.copy_(torch.randn(a.shape, generator=g))
    fast = FastSuperNet(**kw)
    fast.load_state_dict(plain.state_dict())
    return plain.to(dtype), fast.to(dtype)


def run(model, x, y, train=True, inputs=None):
    model.train(train)
    model.zero_grad(set_to_none=True)
    logits = model(x)
    F.cross_entropy(logits, y).backward(inputs=inputs)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return logits.detach(), grads, buffers


def rel(a, b) -> float:
    """:func:`equivalence.rel` with a floor of 1e-6 per element: the supernet's running means
    of already centred inputs are noise around 0."""
    return relative_difference(a, b, floor=1e-6)


def assert_same(fast_out, plain_out, tol=1e-9):
    (lf, gf, bf), (lp, gp, bp) = fast_out, plain_out
    assert lf.shape == lp.shape
    assert rel(lf, lp) < tol, rel(lf, lp)
    assert_same_gradients_and_buffers((gf, bf), (gp, bp), tol, floor=1e-6)


def random_switches(k, seed, with_none):
    rng = random.Random(seed)
    pool = list(PRIMITIVES) if with_none else [p for p in PRIMITIVES if p != "none"]
    out = []
    for _ in range(NUM_EDGES):
        kept = set(rng.sample(pool, k))
        out.append([p for p in PRIMITIVES if p in kept])   # reference order, as P-DARTS keeps it
    return out


# --------------------------------------------------------------------------- same structure


def test_parameter_count_and_names_match_plain():
    plain, fast = SuperNet(16, 10, 8), FastSuperNet(16, 10, 8)
    assert sum(p.numel() for p in fast.weights()) == sum(p.numel() for p in plain.weights()) == 1930618
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert [n for n, _ in fast.named_buffers()] == [n for n, _ in plain.named_buffers()]
    assert fast.reduction_positions(8) == plain.reduction_positions(8)


def test_state_dict_interchangeable_both_ways():
    plain, fast = pair(torch.float32, channels=4, layers=3, in_channels=3)
    x, y = random_batch(4, 3, 8, torch.float32)
    fast2 = FastSuperNet(channels=4, layers=3, in_channels=3, seed=99)
    fast2.load_state_dict(plain.state_dict())
    plain2 = SuperNet(channels=4, layers=3, in_channels=3, seed=99)
    plain2.load_state_dict(fast.state_dict())
    for m in (plain, fast, fast2, plain2):
        m.eval()
    with torch.no_grad():
        ref = plain(x)
        for m in (fast, fast2, plain2):
            torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)


def test_genotype_and_alpha_views_identical():
    switches = random_switches(5, seed=1, with_none=True)
    plain, fast = pair(torch.float32, channels=4, layers=3, switches_normal=switches, switches_reduce=switches[::-1])
    assert fast.genotype() == plain.genotype()
    for cell in ("normal", "reduce"):
        assert (fast.full_alpha(cell) == plain.full_alpha(cell)).all()
    for k, v in plain.alphas_numpy().items():
        assert (fast.alphas_numpy()[k] == v).all()


# --------------------------------------------------------------------------- same function (float64)

CASES = {
    "full space 3x16x16": dict(kw=dict(channels=4, layers=5, in_channels=3), x=(6, 3, 16)),
    "1x28x28 (7x7 maps)": dict(kw=dict(channels=4, layers=5, in_channels=1), x=(4, 1, 28)),
    "1x14x14 (odd 7x7 into stride 2 and FactorizedReduce)": dict(kw=dict(channels=4, layers=5, in_channels=1), x=(4, 1, 14)),
    "P-DARTS 5 ops with none": dict(kw=dict(channels=4, layers=4, in_channels=3,
                                            switches_normal=random_switches(5, 1, True),
                                            switches_reduce=random_switches(5, 2, True)), x=(4, 3, 12)),
    "P-DARTS 5 ops without none": dict(kw=dict(channels=4, layers=4, in_channels=3,
                                               switches_normal=random_switches(5, 3, False),
                                               switches_reduce=random_switches(5, 4, False)), x=(4, 3, 12)),
    "2 ops per edge": dict(kw=dict(channels=4, layers=3, in_channels=3,
                                   switches_normal=random_switches(2, 5, True),
                                   switches_reduce=random_switches(2, 6, False)), x=(4, 3, 8)),
    "skip dropout set to 0": dict(kw=dict(channels=4, layers=3, in_channels=3, skip_dropout=0.0), x=(4, 3, 8)),
}


@pytest.fixture(params=[True, False], ids=["C kernels", "PyTorch kernels"])
def c_kernels(request, monkeypatch):
    """Both implementations of the batch norms and scaled adds: the C kernels of
    :mod:`nbutils.accel.channels_last_kernels` and the PyTorch fallback used without a compiler."""
    if not request.param:
        monkeypatch.setattr(channels_last_kernels, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("name", list(CASES))
def test_same_logits_gradients_and_running_stats_float64(name, c_kernels):
    case = CASES[name]
    plain, fast = pair(**case["kw"])
    x, y = random_batch(*case["x"])
    assert_same(run(fast, x, y), run(plain, x, y))
    # a second step, from the updated running stats, in eval mode (BN uses them)
    assert_same(run(fast, x, y, train=False), run(plain, x, y, train=False))


def test_skip_dropout_zero_and_eval_mode_match():
    plain, fast = pair(channels=4, layers=3, in_channels=3, skip_dropout=0.3)
    x, y = random_batch(4, 3, 8)
    for m in (plain, fast):
        m.set_skip_dropout(0.0)
    assert_same(run(fast, x, y), run(plain, x, y))
    for m in (plain, fast):
        m.set_skip_dropout(0.3)
    assert_same(run(fast, x, y, train=False), run(plain, x, y, train=False))


def test_dropout_only_on_identity_skips_in_train_mode():
    plain, fast = pair(channels=4, layers=3, in_channels=3, skip_dropout=0.5)
    x, y = random_batch(4, 3, 8)
    drops = [m for m in fast.modules() if isinstance(m, nn.Dropout)]
    identity_skips = sum(
        1 for cell in fast.cells for e in cell.edges
        for name, op in zip(e.primitives, e.ops) if name == "skip_connect" and not hasattr(op, "conv_1")
    )
    assert len(drops) == identity_skips > 0
    calls = []
    hooks = [m.register_forward_hook(lambda mod, i, o: calls.append(mod)) for m in drops]
    fast.train()
    fast(x)
    assert len(calls) == len(drops) and {id(m) for m in calls} == {id(m) for m in drops}
    for h in hooks:
        h.remove()
    plain, fast = pair(channels=4, layers=3, in_channels=3, skip_dropout=0.5)   # fresh running stats
    # p = 1 is deterministic (identity skips give zero): the two networks must agree exactly,
    # and differ from p = 0 (so the dropout does act)
    for m in (plain, fast):
        m.set_skip_dropout(1.0)
    out_fast = run(fast, x, y)
    assert_same(out_fast, run(plain, x, y))
    for m in (plain, fast):
        m.set_skip_dropout(0.0)
    assert rel(run(fast, x, y)[0], out_fast[0]) > 1e-3


def test_arch_only_backward_gives_alpha_gradients_and_no_weight_gradients():
    plain, fast = pair(channels=4, layers=3, in_channels=3)
    x, y = random_batch(4, 3, 8)
    gf = run(fast, x, y, inputs=fast.arch_parameters())[1]
    gp = run(plain, x, y, inputs=plain.arch_parameters())[1]
    assert set(gf) == set(gp) == {"alpha_normal", "alpha_reduce"}
    for n in gp:
        assert rel(gf[n], gp[n]) < 1e-9
    weights = list(fast.weights())
    gw = run(fast, x, y, inputs=weights)[1]
    assert "alpha_normal" not in gw and len(gw) == len(weights)


def test_arch_only_backward_skips_unused_input_gradients(monkeypatch):
    """The architecture step's backward ends at the first cell's operations on its two inputs
    (nothing below them leads to alpha): their batch norms compute no input gradient there,
    and every one of them does in a backward to the weights."""
    if not channels_last_kernels.available():
        pytest.skip("no C compiler")
    needs = []
    backward, backward_blocks = channels_last_kernels.bn_backward, channels_last_kernels.bn_backward_blocks

    def recording(grad, x, weight, bias, mean, invstd, relu, need):
        needs.append(need[0])
        return backward(grad, x, weight, bias, mean, invstd, relu, need)

    def recording_blocks(dtype, grad, x, m, c, weights, mean, invstd, relu, grad_input, grad_weight):
        needs.extend(pointer != 0 for pointer in grad_input)   # the fused convolutions (mixed_convs)
        return backward_blocks(dtype, grad, x, m, c, weights, mean, invstd, relu, grad_input, grad_weight)
    monkeypatch.setattr(channels_last_kernels, "bn_backward", recording)
    monkeypatch.setattr(channels_last_kernels, "bn_backward_blocks", recording_blocks)
    _, fast = pair(channels=4, layers=3, in_channels=3)
    x, y = random_batch(4, 3, 8)
    run(fast, x, y, inputs=fast.arch_parameters())
    assert needs and not all(needs) and any(needs)
    needs.clear()
    run(fast, x, y, inputs=list(fast.weights()))
    assert needs and all(needs)



def test_input_gradient_with_frozen_weights_matches_plain():
    """What crafting a poison asks of the supernet: the gradient of the images alone, every
    parameter frozen (the fused convolutions then compute their input gradients and no weight's)."""
    plain, fast = pair(channels=4, layers=5, in_channels=1)
    x, y = random_batch(4, 1, 16)
    grads = []
    for m in (plain, fast):
        m.train()
        for p in m.parameters():
            p.requires_grad_(False)
        images = x.clone().requires_grad_()
        F.cross_entropy(m(images), y).backward()
        grads.append(images.grad)
        assert all(p.grad is None for p in m.parameters())
    assert rel(grads[1], grads[0]) < 1e-9

# --------------------------------------------------------------------------- float32 paths (oneDNN, channels_last)


@pytest.mark.parametrize("shape,kw", [
    ((4, 3, 32), dict(channels=4, layers=3, in_channels=3)),
    ((4, 1, 14), dict(channels=4, layers=5, in_channels=1,
                      switches_normal=random_switches(5, 7, True), switches_reduce=random_switches(5, 8, True))),
])
def test_float32_as_accurate_as_plain(shape, kw, c_kernels):
    ref64 = run(*pair(torch.float64, **kw)[:1], *random_batch(*shape))
    plain, fast = pair(torch.float32, **kw)
    x, y = random_batch(*shape, dtype=torch.float32)
    outs = {"fast": run(fast, x, y), "plain": run(plain, x, y)}
    for part in (0, 1, 2):
        ref = {"": ref64[0]} if part == 0 else ref64[part]
        for n, r in ref.items():
            if n.endswith("num_batches_tracked"):
                continue
            get = (lambda o: o[0]) if part == 0 else (lambda o: o[part][n])
            e_fast, e_plain = rel(get(outs["fast"]), r), rel(get(outs["plain"]), r)
            assert e_fast <= 10 * e_plain + 1e-5, (n or "logits", e_fast, e_plain)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_activations_channels_last_also_for_one_input_channel(in_channels, monkeypatch):
    """Every batch norm sees a channels_last tensor, also for grey images, whose input is NCHW
    and channels_last at once (the stem must not hand NCHW on to the cells)."""
    layouts = []
    batch_norm = accel_batch_norm.batch_norm

    def recording(x, *args, **kw):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return batch_norm(x, *args, **kw)
    for module in (accel_batch_norm, operations, fast_supernet):   # every module that calls it
        monkeypatch.setattr(module, "batch_norm", recording)
    _, fast = pair(torch.float32, channels=4, layers=3, in_channels=in_channels)
    run(fast, *random_batch(4, in_channels, 8, dtype=torch.float32))
    assert layouts and all(layouts)


# --------------------------------------------------------------------------- autograd: second order, functional_call


@pytest.mark.parametrize("k,stride,dilation,size", [
    (3, 1, 1, 6), (5, 1, 1, 6), (3, 1, 2, 6), (5, 1, 2, 8), (3, 1, 2, 5),
    (3, 2, 1, 6), (5, 2, 1, 5), (3, 2, 2, 6), (5, 2, 2, 7),
])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])   # oneDNN's, the C kernels
def test_depthwise_conv_gradgradcheck(k, stride, dilation, size, layout):
    g = torch.Generator().manual_seed(k * 10 + stride + dilation)
    x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64).contiguous(memory_format=layout)
    x.requires_grad_()
    w = torch.randn(3, 1, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    pad = dilation * (k - 1) // 2
    ref = F.conv2d(x, w, None, stride, pad, dilation, 3)
    out = depthwise_conv2d(x, w, stride, pad, dilation)
    torch.testing.assert_close(out, ref)
    f = lambda a, b: depthwise_conv2d(a, b, stride, pad, dilation)
    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


def test_second_order_hessian_vector_products_match():
    """d/dw of (d L / d alpha . v): what an exact second-order architect would differentiate."""
    plain, fast = pair(channels=2, layers=3, in_channels=1)
    x, y = random_batch(2, 1, 8)
    v = [torch.randn_like(a) for a in plain.arch_parameters()]
    results = []
    for m in (plain, fast):
        m.train()
        loss = F.cross_entropy(m(x), y)
        ga = torch.autograd.grad(loss, m.arch_parameters(), create_graph=True)
        dot = sum((g * u).sum() for g, u in zip(ga, v))
        weights = list(m.weights())
        hv = torch.autograd.grad(dot, weights + m.arch_parameters(), allow_unused=True)
        results.append(([g.detach() for g in ga], [h for h in hv]))
    (ga_p, hv_p), (ga_f, hv_f) = results
    for a, b in zip(ga_f, ga_p):
        assert rel(a, b) < 1e-9
    for a, b in zip(hv_f, hv_p):
        if b is None or a is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            assert rel(a, b) < 1e-8


def test_functional_call_with_plain_parameters():
    plain, fast = pair(channels=4, layers=3, in_channels=3)
    x, y = random_batch(4, 3, 8)
    params = {n: p.detach().clone().requires_grad_() for n, p in plain.named_parameters()}
    buffers = {n: b.clone() for n, b in plain.named_buffers()}
    outs = []
    for m in (plain, fast):
        m.train()
        p = {n: t.detach().clone().requires_grad_() for n, t in params.items()}
        logits = torch.func.functional_call(m, ({**p}, {n: b.clone() for n, b in buffers.items()}), (x,))
        grads = torch.autograd.grad(F.cross_entropy(logits, y), list(p.values()))
        outs.append((logits.detach(), dict(zip(p, grads))))
    (lp, gp), (lf, gf) = outs
    assert rel(lf, lp) < 1e-9
    for n in gp:
        assert rel(gf[n], gp[n]) < 1e-9, n


def test_gradients_wrt_non_leaf_unrolled_weights_match():
    """The unrolled (second-order) architect differentiates w.r.t. w' = w - lr * g, non-leaf
    tensors fed through functional_call with copies of the BN buffers."""
    plain, fast = pair(channels=4, layers=3, in_channels=1)
    x, y = random_batch(4, 1, 8)
    outs = []
    for m in (plain, fast):
        m.train()
        names = [n for n, _ in m.named_parameters() if not n.startswith("alpha")]
        base = {n: p for n, p in m.named_parameters()}
        weights = [base[n] for n in names]
        grads = torch.autograd.grad(F.cross_entropy(m(x), y), weights)
        unrolled = [w - 0.1 * g for w, g in zip(weights, grads)]
        state = {**base, **dict(zip(names, unrolled)), **{n: b.clone() for n, b in m.named_buffers()}}
        loss = F.cross_entropy(torch.func.functional_call(m, state, (x,)), y)
        outs.append(torch.autograd.grad(loss, [*m.arch_parameters(), *unrolled], materialize_grads=True))
    for a, b in zip(outs[1], outs[0]):
        assert rel(a, b) < 1e-9


@pytest.mark.parametrize("size", [(6, 6), (7, 5)])
def test_even_odd_pixels_gradgradcheck(size):
    g = torch.Generator().manual_seed(sum(size))
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    even, odd = EvenOdd.apply(x)
    assert torch.equal(even, x[:, :, ::2, ::2]) and torch.equal(odd, x[:, :, 1::2, 1::2])
    assert even.is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(EvenOdd.apply, (x,))
    assert torch.autograd.gradgradcheck(EvenOdd.apply, (x,))
    # only one of the two outputs used: the other's pixels get a zero gradient
    (grad,) = torch.autograd.grad(odd.sum(), x)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    assert grad[:, :, 1::2, 1::2].eq(1).all() and grad.sum() == odd.numel()


@pytest.mark.parametrize("stride,size", [(1, (6, 6)), (1, (5, 7)), (2, (6, 6)), (2, (7, 5))])
def test_average_pool_as_depthwise_convolution(stride, size):
    pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    g = torch.Generator().manual_seed(stride * 100 + size[0])
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    ours, ref = pool_op(x, pool), pool(x)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    v = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (g_ours,), (g_ref,) = torch.autograd.grad((ours * v).sum(), x), torch.autograd.grad((ref * v).sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_running_stats_with_cumulative_momentum():
    """``momentum=None`` (a cumulative average, 1 / num_batches_tracked) as F.batch_norm does."""
    plain, fast = pair(channels=4, layers=3, in_channels=3)
    for model in (plain, fast):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    for seed in (0, 1):
        x, y = random_batch(4, 3, 8, seed=seed)
        assert_same(run(fast, x, y), run(plain, x, y))


@pytest.mark.parametrize("relu,scaled", [(False, False), (True, True)])
def test_pointwise_batch_norm_node_gradcheck(relu, scaled):
    """The fused 1x1 convolution and batch norm (one autograd node) against autograd, to second order."""
    if not channels_last_kernels.available():
        pytest.skip("no C kernels")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    conv = torch.randn(6, 4, 1, 1, generator=g, dtype=torch.float64)
    scale = torch.rand(6, generator=g, dtype=torch.float64) + 0.5 if scaled else None
    inputs = [x.requires_grad_(), conv.requires_grad_()] + ([scale.requires_grad_()] if scaled else [])

    def f(x, conv, *scale):
        return PointwiseBatchNorm.apply(x, conv, scale[0] if scale else None, None, 1e-5, relu)[0]

    def ref(x, conv, *scale):
        out = F.batch_norm(F.conv2d(x, conv), None, None, scale[0] if scale else None, None, True, 0.0, 1e-5)
        return out.relu() if relu else out
    torch.testing.assert_close(f(*inputs), ref(*inputs))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
