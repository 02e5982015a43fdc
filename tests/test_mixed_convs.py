"""The fused node of :mod:`nbutils.accel.mixed_convs`: the separable and dilated convolutions
that read one state, as one autograd node, against PyTorch's autograd of the same function.

The whole supernet is compared with the plain one in ``tests/test_fast_supernet.py`` (where
this node runs wherever it applies); here the node alone: its outputs per node, its gradients
(``gradcheck``) and its double backward (``gradgradcheck``, which runs the recomputation), in
a normal state and in a reduction state (stride-2 convolutions and the even pixels)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nbutils.accel import channels_last_kernels
from nbutils.accel.batch_norm import RunningStats
from nbutils.accel.channels_last import CHANNELS_LAST, EvenOdd
from nbutils.accel.mixed_convs import _MixedConvs, _build, mixed_convs
from nbutils.space.ops import OPS

pytestmark = pytest.mark.skipif(not channels_last_kernels.available(), reason="no C compiler")

CONVS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


def state_convs(c: int, stride: int, edges: int, seed: int = 0, affine: bool = False, names=CONVS):
    """The convolutions ``names`` of ``edges`` mixed operations reading one state, in float64,
    each with a random per-channel weight: ``[(node, scale, name, op)]``."""
    torch.manual_seed(seed)
    convs = []
    for node in range(edges):
        for name in names:
            op = OPS[name](c, stride, affine).double().train()
            convs.append((node, torch.rand(c, dtype=torch.float64) + 0.5, name, op))
    return convs


def relu_state(n: int, c: int, size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, size, size, dtype=torch.float64, generator=g).contiguous(memory_format=CHANNELS_LAST)
    return F.relu(h)


def per_operation(relu_h, convs):
    """What the fused node computes, operation by operation with the modules themselves
    (``op[1:]``: the module minus its leading ReLU, which ``relu_h`` already holds)."""
    outs: dict[int, torch.Tensor] = {}
    for node, scale, _, op in convs:
        y = torch.nn.Sequential(*list(op)[1:])(relu_h) * scale.view(1, -1, 1, 1)
        outs[node] = y if node not in outs else outs[node] + y
    return outs


@pytest.mark.parametrize("stride,edges,size,names", [(1, 2, 6, CONVS), (2, 2, 6, CONVS), (1, 1, 5, CONVS),
                                                     (2, 3, 6, ("dil_conv_5x5",)), (1, 2, 4, ("sep_conv_3x3",))])
def test_outputs_and_running_stats_match_the_operations(stride, edges, size, names):
    """Every node's sum, also where an edge holds one convolution (as P-DARTS' pruned edges
    may), or only dilated ones (in a reduction state: the even pixels alone)."""
    convs = state_convs(3, stride, edges, names=names)
    relu_h = relu_state(2, 3, size)
    halves = EvenOdd.apply(relu_h) if stride == 2 else None
    stats = RunningStats()
    fused = mixed_convs((relu_h, halves[0] if halves else None), convs, stats)
    assert fused is not None and [node for node, _ in fused] == list(range(edges))
    stats.apply()
    fused_stats = [(m.running_mean.clone(), m.running_var.clone()) for *_, op in convs for m in op if
                   isinstance(m, torch.nn.BatchNorm2d)]
    for *_, op in convs:   # the modules' own forward from the same running statistics
        for m in op:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
    expected = per_operation(relu_h, convs)
    for node, out in fused:
        torch.testing.assert_close(out, expected[node], rtol=1e-12, atol=1e-12)
        assert out.is_contiguous(memory_format=CHANNELS_LAST)
    plain_stats = [(m.running_mean, m.running_var) for *_, op in convs for m in op if isinstance(m, torch.nn.BatchNorm2d)]
    for (a, b), (c, d) in zip(fused_stats, plain_stats):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b, d, rtol=1e-12, atol=1e-14)


def fused_function(stride: int, edges: int, size: int):
    """The node as a function of its tensors (a fresh copy of each, requiring gradients), for
    gradcheck."""
    convs = state_convs(2, stride, edges, seed=2)
    relu_h = relu_state(2, 2, size, seed=3)
    even = EvenOdd.apply(relu_h)[0] if stride == 2 else None
    plan, tensors, _ = _build((relu_h, even), convs)
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    return (lambda *ts: _MixedConvs.apply(plan, RunningStats(), *ts)), tensors


@pytest.mark.parametrize("stride", [1, 2])
def test_gradients_and_double_backward(stride):
    f, tensors = fused_function(stride, edges=2, size=4)
    assert torch.autograd.gradcheck(f, tensors)
    assert torch.autograd.gradgradcheck(f, tensors)


def test_architecture_only_backward_gives_the_weight_gradients_alone():
    """With the inputs and the convolution weights not needed (the first cell in the
    architecture step), the node still gives every operation's architecture-weight gradient."""
    f, tensors = fused_function(1, edges=2, size=4)
    outs = f(*tensors)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    scales = tensors[-8:]
    full = torch.autograd.grad(loss, tensors, retain_graph=True)
    only = torch.autograd.grad(loss, scales)
    for a, b in zip(only, full[-8:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("why", ["affine", "eval"])
def test_does_not_apply_where_the_operations_differ(why):
    convs = state_convs(2, 1, 1, affine=why == "affine")
    if why == "eval":
        for *_, op in convs:
            op.eval()
    assert mixed_convs((relu_state(2, 2, 4), None), convs, RunningStats()) is None
