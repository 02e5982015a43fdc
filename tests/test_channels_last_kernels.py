"""The C kernels (batch norm, scaled add, depthwise convolution) against PyTorch computed in float64."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nbutils.accel import channels_last_kernels as cbn

CL = torch.channels_last


def test_kernels_build_here():
    # the Makefile installs a C compiler; without one the fast supernet silently loses its kernels
    assert cbn.available()


def _data(shape, dtype, seed=0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + mean).to(dtype).contiguous(memory_format=CL)
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=CL)
    c = shape[1]
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return x, grad, weight, bias


def _reference(x, grad, weight, bias, eps, relu):
    """PyTorch's batch norm (and ReLU) in float64 on NCHW tensors: outputs and gradients."""
    x64 = x.double().contiguous().requires_grad_()
    w64 = None if weight is None else weight.double().requires_grad_()
    b64 = None if bias is None else bias.double().requires_grad_()
    out, mean, invstd = torch.native_batch_norm(x64, w64, b64, None, None, True, 0.0, eps)
    if relu:
        out = out.relu()
    inputs = [t for t in (x64, w64, b64) if t is not None]
    grads = torch.autograd.grad(out, inputs, grad.double())
    return out.detach(), mean, invstd, grads


def _relative(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(8, 16, 12, 12), (3, 5, 7, 9), (1, 64, 1, 2)])
def test_forward_and_backward_match_pytorch(dtype, bound, relu, affine, shape):
    x, grad, weight, bias = _data(shape, dtype, mean=3.0)
    if not affine:
        weight = bias = None
    out_ref, mean_ref, invstd_ref, grads_ref = _reference(x, grad, weight, bias, 1e-5, relu)
    inputs = [x.requires_grad_()] + [t.requires_grad_() for t in (weight, bias) if t is not None]
    out, mean, invstd = cbn.batch_norm(x, weight, bias, 1e-5, relu)
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    # PyTorch's NCHW kernel on the same data: with two values per channel (ill-conditioned)
    # its float32 error exceeds the bound, and ours may be up to twice its error
    nchw = [t.detach().contiguous().requires_grad_() for t in inputs]
    native, _, native_invstd = torch.native_batch_norm(nchw[0], *(nchw[1:] or [None, None]), None, None, True, 0.0, 1e-5)
    native = native.relu() if relu else native
    assert _relative(out, out_ref) < max(bound, 2 * _relative(native, out_ref))
    assert _relative(mean, mean_ref) < bound
    assert _relative(invstd, invstd_ref) < max(bound, 2 * _relative(native_invstd, invstd_ref))
    grads = torch.autograd.grad(out, inputs, grad)
    native_grads = torch.autograd.grad(native, nchw, grad.contiguous())
    for g, g_ref, g_native in zip(grads, grads_ref, native_grads):
        assert g.dtype == dtype
        assert _relative(g, g_ref) < max(10 * bound, 2 * _relative(g_native, g_ref))


def test_relu_mask_is_the_forward_s():
    x, grad, weight, bias = _data((4, 8, 6, 6), torch.float32)
    x.requires_grad_()
    out, *_ = cbn.batch_norm(x, weight, bias, 1e-5, relu=True)
    plain, *_ = cbn.batch_norm(x.detach(), weight, bias, 1e-5, relu=False)
    assert torch.equal(out, plain.relu())
    (gx_relu,) = torch.autograd.grad(out, x, grad)
    x2 = x.detach().requires_grad_()
    out2, *_ = cbn.batch_norm(x2, weight, bias, 1e-5, relu=False)
    (gx,) = torch.autograd.grad(out2, x2, grad * (out2 > 0))
    torch.testing.assert_close(gx_relu, gx, rtol=0, atol=1e-6)


def test_float32_statistics_beat_pytorchs_channels_last_kernel():
    # a large mean against the spread, as after a max pool: PyTorch's kernel sums in float32
    x, *_ = _data((64, 16, 32, 32), torch.float32, mean=50.0)
    _, mean_ref, invstd_ref, _ = _reference(x, torch.zeros_like(x), None, None, 1e-5, False)
    _, mean, invstd = cbn.batch_norm(x, None, None, 1e-5)
    _, mean_native, invstd_native = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    assert _relative(invstd, invstd_ref) < 1e-6
    assert _relative(invstd, invstd_ref) < _relative(invstd_native, invstd_ref) / 10


def test_only_the_asked_gradients_and_double_backward():
    x, grad, weight, bias = _data((2, 3, 4, 4), torch.float64)
    w = weight.requires_grad_()
    out, *_ = cbn.batch_norm(x, w, bias, 1e-5, relu=True)   # x and bias need no gradient
    (gw,) = torch.autograd.grad(out, w, grad)
    *_, grads_ref = _reference(x, grad, weight.detach(), bias, 1e-5, True)
    assert _relative(gw, grads_ref[1]) < 1e-12
    f = lambda x, w, b: cbn.batch_norm(x, w, b, 1e-5, relu=False)[0]   # noqa: E731
    inputs = (x.clone().requires_grad_(), weight.detach().clone().requires_grad_(), bias.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_same_result_with_one_or_two_threads():
    x, grad, weight, bias = _data((16, 16, 8, 8), torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xr = x.clone().requires_grad_()
            out, mean, invstd = cbn.batch_norm(xr, weight, bias, 1e-5)
            results.append((out, mean, invstd, *torch.autograd.grad(out, xr, grad)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):   # the partial sums differ, the answer within rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_other_tensors_take_pytorchs_kernel():
    x, _, weight, bias = _data((4, 3, 5, 5), torch.float32)
    nchw = x.contiguous()
    assert not cbn.applies(nchw) and not cbn.applies(x.half()) and not cbn.applies(x[:1, :, :1, :1])
    out, mean, invstd = cbn.batch_norm(nchw, weight, bias, 1e-5, relu=True)
    ref = torch.native_batch_norm(nchw, weight, bias, None, None, True, 0.0, 1e-5)
    torch.testing.assert_close(out, ref[0].relu())
    torch.testing.assert_close(mean, ref[1])


def test_builds_into_the_cache_and_can_be_switched_off(tmp_path):
    script = ("from nbutils.accel import channels_last_kernels as c; import sys, pathlib; "
              "print(c.available(), len(list(pathlib.Path(sys.argv[1]).glob('*.so'))))")
    env = dict(os.environ, NBUTILS_KERNEL_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["True", "1"]
    env["NBUTILS_NO_C_KERNELS"] = "1"
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "1"]


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("need_value,need_scale", [(True, True), (True, False), (False, True)])
def test_scaled_add_backward_matches_autograd(dtype, bound, need_value, need_scale):
    value, grad, scale, _ = _data((6, 12, 9, 7), dtype)
    strided_grad = torch.randn(6, 24, 9, 7, dtype=dtype).contiguous(memory_format=CL)[:, 12:]   # a channel slice
    for g in (grad, strided_grad):
        v64, s64 = value.double().requires_grad_(), scale.double().requires_grad_()
        ref_value, ref_scale = torch.autograd.grad(v64 * s64.view(1, -1, 1, 1), (v64, s64), g.double())
        grad_value, grad_scale = cbn.scaled_add_backward(g, value, scale, need_value, need_scale)
        assert (grad_value is not None) == need_value and (grad_scale is not None) == need_scale
        if need_value:
            assert grad_value.dtype == dtype and grad_value.is_contiguous(memory_format=CL)
            assert _relative(grad_value, ref_value) < bound
        if need_scale:
            assert grad_scale.shape == scale.shape and _relative(grad_scale, ref_scale) < bound


# --------------------------------------------------------------------------- depthwise convolution

DEPTHWISE_CASES = [   # (N, C, H, W), k, stride, dilation: the supernet's kinds, odd sizes, generic widths
    ((3, 8, 8, 8), 3, 1, 1), ((3, 8, 8, 8), 5, 1, 1), ((3, 8, 8, 8), 3, 1, 2), ((3, 8, 8, 8), 5, 1, 2),
    ((2, 16, 7, 9), 3, 2, 1), ((2, 16, 7, 9), 5, 2, 1), ((2, 16, 6, 6), 3, 2, 2), ((2, 16, 7, 7), 5, 2, 2),
    ((2, 5, 5, 4), 3, 1, 1), ((2, 32, 2, 2), 5, 1, 2), ((2, 64, 3, 3), 3, 1, 1), ((2, 3, 9, 9), 5, 2, 2),
]


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape,k,stride,dilation", DEPTHWISE_CASES)
def test_depthwise_forward_and_gradients_match_pytorch(shape, k, stride, dilation, dtype, bound):
    g = torch.Generator().manual_seed(sum(shape) + 10 * k + stride + dilation)
    x = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=CL)
    w = torch.randn(shape[1], 1, k, k, generator=g, dtype=dtype)
    pad = dilation * (k - 1) // 2
    assert cbn.depthwise_applies(x, w)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = torch.nn.functional.conv2d(x64, w64, None, stride, pad, dilation, shape[1])
    grad = torch.randn(ref.shape, generator=g, dtype=dtype).contiguous(memory_format=CL)
    ref_x, ref_w = torch.autograd.grad(ref, (x64, w64), grad.double())
    out = cbn.depthwise_forward(x, w, stride, pad, dilation)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=CL)
    assert _relative(out, ref) < bound
    gx = cbn.depthwise_input_grad(grad, w, x.shape, stride, pad, dilation)
    assert gx.is_contiguous(memory_format=CL) and _relative(gx, ref_x) < bound
    assert _relative(cbn.depthwise_weight_grad(x, grad, k, stride, pad, dilation), ref_w) < bound
    total = cbn.depthwise_input_grad(grad, w, x.shape, stride, pad, dilation, out=gx.clone())   # summed into out
    assert _relative(total, 2 * ref_x) < bound


def test_depthwise_weight_gradient_same_with_one_or_two_threads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, 8, 8, generator=g).contiguous(memory_format=CL)
    grad = torch.randn(5, 8, 8, 8, generator=g).contiguous(memory_format=CL)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(cbn.depthwise_weight_grad(x, grad, 5, 1, 2, 1))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_depthwise_takes_channels_last_only():
    w = torch.randn(3, 1, 3, 3)
    x = torch.randn(2, 3, 5, 5)
    assert not cbn.depthwise_applies(x, w)
    assert cbn.depthwise_applies(x.contiguous(memory_format=CL), w)
    assert not cbn.depthwise_applies(x.contiguous(memory_format=CL), w.double())
    assert not cbn.depthwise_applies(x.contiguous(memory_format=CL), torch.randn(3, 1, 3, 5))


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_running_stats_update_matches_batch_norm(dtype, bound):
    g = torch.Generator().manual_seed(3)
    modules, refs, means, invstds, unbias = [], [], [], [], []
    for c, momentum in ((4, 0.1), (6, 0.3), (4, 0.1)):
        bn = torch.nn.BatchNorm2d(c, momentum=momentum).to(dtype)
        with torch.no_grad():
            bn.running_mean.normal_(generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
        ref = torch.nn.BatchNorm2d(c, momentum=momentum).to(dtype)
        ref.load_state_dict(bn.state_dict())
        x = torch.randn(5, c, 3, 3, generator=g, dtype=dtype).contiguous(memory_format=CL)
        ref.train()(x)
        _, mean, invstd = cbn.bn_forward(x, None, None, bn.eps, False)
        modules.append(bn), refs.append(ref), means.append(mean), invstds.append(invstd)
        unbias.append(45 / 44)
    assert cbn.running_stats_update(modules, means, invstds, [bn.momentum for bn in modules], unbias)
    for bn, ref in zip(modules, refs):
        assert _relative(bn.running_mean, ref.running_mean.double()) < bound
        assert _relative(bn.running_var, ref.running_var.double()) < bound
        assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
    half = torch.nn.BatchNorm2d(4)   # float32 buffers against float64 statistics: left to the caller
    before = half.running_mean.clone()
    assert not cbn.running_stats_update([half], [means[0].double()], [invstds[0].double()], [0.1], [1.0])
    assert torch.equal(half.running_mean, before) and half.num_batches_tracked.item() == 0
