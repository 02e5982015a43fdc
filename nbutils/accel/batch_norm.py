"""Training-mode batch norm for the fast networks, accurate on channels_last, with what comes
before and after it: the 1x1 convolution before (one autograd node with the norm), an
architecture weight folded into its affine weight, a ReLU fused after it, and the running
statistics of a whole forward updated at once.

* **Batch norm in C** (:mod:`nbutils.accel.channels_last_kernels`, built on first use): faster
  forward and backward than PyTorch's channels_last kernels, a ReLU after it fused into both,
  statistics summed accurately enough that the input need not be centred (see Accuracy).
  Without a C compiler, PyTorch's kernels run instead, with the centring.
* **Weights folded into the batch norms** (``scale``): ``w * BN(y)`` costs no pass of its own,
  and the backward kernel returns the gradient of ``w`` as its weight gradient.
* **A pointwise convolution and its batch norm as one autograd node**
  (:class:`PointwiseBatchNorm`, on the C kernels): the matrix product and the batch norm of
  :func:`pointwise` and :func:`batch_norm`, whose views, product and batch norm otherwise make
  seven nodes, each with a fixed cost in the forward and in the backward.
* **Pointwise convolutions as matrix products** (:func:`pointwise`) of the channels_last
  pixels: oneDNN's 1x1 convolution pays a fixed cost per call that dominates at the small
  widths of a CPU search.
* **Pointwise convolutions centred through their bias** (:func:`centred_pointwise`, for
  PyTorch's batch-norm kernel only): its accurate use on channels_last needs a centred input
  (see Accuracy); for ``BN(W x)`` the mean is ``W mean(x)``, subtracted by the convolution's
  bias, with no subtraction pass.
* **Running statistics updated once per forward** (:class:`RunningStats`): seven small
  operations per BN module, thousands per forward, become one C call
  (:func:`channels_last_kernels.running_stats_update`), or without it a handful of
  ``torch._foreach_*`` calls, on the statistics the kernel returns.

Accuracy: PyTorch's channels_last batch-norm kernel accumulates its statistics in float32
with a large error (~5e-6 relative at 64 x 32 x 32 values per channel, ~1e-4 when the mean
is large against the spread, e.g. after a max pool, against ~1e-7 for the NCHW kernel);
uncorrected, float32 gradients lose accuracy against the plain networks'. The C kernels sum
blocks of 16 rows in float32 and the blocks in double, shifted by the first row: ~1e-7
relative, better than PyTorch's NCHW kernel. With PyTorch's kernel, :func:`batch_norm`
centres the input first (BN is shift-invariant) on its mean over the first images
(:func:`centre_estimate`, within ~2% of the spread of the batch mean: any shift is exact, this one is
close enough for the sums) and adds the shift back into the running statistics; what remains
is ~1e-5 relative in float32. Either way float64 agrees with the plain networks to ~1e-12.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import channels_last_kernels
from .channels_last import CHANNELS_LAST, engine_will_need, layout, on_c_kernels

__all__ = ["RunningStats", "centre_estimate", "batch_norm", "scaled_affine", "pointwise", "centred_pointwise",
           "PointwiseBatchNorm", "pointwise_batch_norm"]


class RunningStats:
    """The running-statistics updates of one forward pass, applied together at its end.

    In train mode every BN module updates its running mean and variance with the batch's;
    done one module at a time that is seven small operations per module, thousands per
    forward of DARTS' supernet, whose per-call overhead adds up. The batch statistics
    are collected here as the kernel returns them (the mean and ``1 / sqrt(var + eps)``) and
    :meth:`apply` updates every module with a handful of ``torch._foreach_*`` calls, the
    arithmetic ``F.batch_norm`` does: ``(1 - momentum) * running + momentum * batch``, the
    variance unbiased, the momentum ``1 / num_batches_tracked`` when it is ``None``.
    """

    def __init__(self) -> None:
        self.bns: list[nn.BatchNorm2d] = []
        self.means: list[torch.Tensor] = []
        self.invstds: list[torch.Tensor] = []
        self.counts: list[int] = []   # values per channel

    def add(self, bns: list[nn.BatchNorm2d], mean: torch.Tensor, invstd: torch.Tensor, count: int) -> None:
        """Batch statistics ``mean`` and ``invstd`` (from ``count`` values per channel) for
        the modules ``bns`` (those that track running statistics)."""
        bns = [bn for bn in bns if bn.track_running_stats and bn.running_mean is not None]
        if bns:
            self.bns.append(bns)
            self.means.append(mean)
            self.invstds.append(invstd)
            self.counts.append(count)

    @torch.no_grad()
    def apply(self) -> None:
        if not self.bns:
            return
        if self._apply_in_c():
            return
        # unbiased variance from 1 / sqrt(biased var + eps); clamped: rounding near var = 0
        variances = torch._foreach_pow(self.invstds, -2.0)
        torch._foreach_sub_(variances, [group[0].eps for group in self.bns])
        torch._foreach_mul_(variances, [n / max(n - 1, 1) for n in self.counts])
        torch._foreach_clamp_min_(variances, 0.0)
        modules = [bn for group in self.bns for bn in group]
        means = [m for m, group in zip(self.means, self.bns) for _ in group]
        variances = [v for v, group in zip(variances, self.bns) for _ in group]
        torch._foreach_add_([bn.num_batches_tracked for bn in modules], 1)
        momenta = [bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked) for bn in modules]
        for running, batch in (("running_mean", means), ("running_var", variances)):
            buffers = [getattr(bn, running) for bn in modules]
            torch._foreach_mul_(buffers, [1.0 - m for m in momenta])
            torch._foreach_add_(buffers, torch._foreach_mul(batch, momenta))
        self._clear()

    def _apply_in_c(self) -> bool:
        """:meth:`apply` in one C call (:func:`channels_last_kernels.running_stats_update`),
        the same arithmetic in double, when the kernels take the tensors and every module has
        a momentum."""
        modules = [bn for group in self.bns for bn in group]
        if any(bn.momentum is None for bn in modules):
            return False
        means = [m for m, group in zip(self.means, self.bns) for _ in group]
        invstds = [v for v, group in zip(self.invstds, self.bns) for _ in group]
        unbias = [n / max(n - 1, 1) for n, group in zip(self.counts, self.bns) for _ in group]
        if not channels_last_kernels.running_stats_update(modules, means, invstds, [bn.momentum for bn in modules],
                                                          unbias):
            return False
        self._clear()
        return True

    def _clear(self) -> None:
        for collected in (self.bns, self.means, self.invstds, self.counts):
            collected.clear()


def centre_estimate(x: torch.Tensor) -> torch.Tensor:
    """An estimate of ``x``'s per-channel mean, close enough to centre it for the batch-norm
    kernel's sums (see :func:`batch_norm`): the mean over the first few images, at least
    2048 values per channel (any shift is exact; this one leaves ~2% of the spread)."""
    n, _, h, w = x.shape
    return x[: min(n, -(-2048 // (h * w)))].mean(dim=(0, 2, 3))


def batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d, stats: RunningStats, shared: list[nn.BatchNorm2d] | None = None,
                scale: torch.Tensor | None = None, centre: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """``bn(x)``, accurate in channels_last too; times ``scale`` (per channel) if given.

    PyTorch's channels_last batch-norm kernel accumulates its statistics with a large float32
    error (~1e-5 relative at 64 x 32 x 32 values per channel, ~1e-4 when the mean is large
    against the spread, as after a max pool), against ~1e-7 for the NCHW kernel. In train
    mode we therefore centre the input first on (an estimate of) its per-channel mean: batch
    norm is invariant to that shift, and the kernel's sums no longer cancel. The running
    statistics, with the shift added back, go to ``stats``. ``shared``: further BN modules
    fed the same tensor (pools): their running stats get the same update. ``centre``: the
    per-channel shift already subtracted from ``x`` (train mode only).

    ``relu``: ReLU after it (fused into the C kernels). Runs on the C kernels of
    :mod:`nbutils.accel.channels_last_kernels` where they apply (no centring needed then).

    ``scale`` is folded into the kernel's affine weight: ``scale * bn(x)`` costs one
    normalisation pass, and in the backward the kernel returns both ``scale * d bn`` and,
    as its weight gradient, the per-channel ``<grad, bn(x)>`` whose sum is d loss / d scale.
    A mixed operation's architecture weight multiplies its output this way for free.
    """
    weight, bias = scaled_affine(bn, scale)
    if not bn.training and bn.track_running_stats:
        out = F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, False, 0.0, bn.eps)
        return out.relu_() if relu else out
    if on_c_kernels(x):
        out, mean, invstd = channels_last_kernels.BatchNormFunction.apply(x, weight, bias, bn.eps, relu)
    else:
        if centre is None and layout(x) == CHANNELS_LAST:
            with torch.no_grad():
                centre = centre_estimate(x)
            x = x - centre.view(1, -1, 1, 1)
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, bn.eps)
        if relu:
            out = out.relu_()   # batch norm's backward needs its input only
    if centre is not None:
        mean = mean + centre
    stats.add([bn] + list(shared or ()), mean, invstd, x.numel() // x.shape[1])
    return out


def scaled_affine(bn: nn.BatchNorm2d, scale: torch.Tensor | None) -> tuple:
    """``bn``'s affine weight and bias times ``scale`` (None where it has none)."""
    weight, bias = bn.weight, bn.bias
    if scale is not None:
        weight = scale if weight is None else weight * scale
        bias = None if bias is None else bias * scale
    return weight, bias



def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 kernel at stride 1. On a channels_last ``x`` it
    is one matrix product of the pixels' channel vectors, ``x``'s ``(N*H*W, C)`` view, with the
    kernel's ``(out, in)`` matrix, and so are its two gradients: oneDNN's 1x1 convolution pays a
    fixed cost per call that dominates at the small widths of a CPU search."""
    if layout(x) != CHANNELS_LAST:
        return F.conv2d(x, weight, bias)
    n, c, h, w = x.shape
    rows, matrix = x.permute(0, 2, 3, 1).reshape(n * h * w, c), weight.view(weight.shape[0], c).t()
    out = rows @ matrix if bias is None else torch.addmm(bias, rows, matrix)
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


def centred_pointwise(x: torch.Tensor, weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.conv2d(x, weight)`` for a 1x1 kernel that ``bn`` normalises next (:func:`pointwise`),
    and the shift it was given: when ``bn`` normalises with batch statistics and ``x`` is
    channels_last, the convolution's bias subtracts (an estimate of) its output's per-channel
    mean, ``weight @ mean(x)``. Batch norm ignores the shift, and its channels_last kernel gets
    the centred input it needs for accurate sums (see :func:`batch_norm`) without a
    subtraction pass of its own."""
    if (bn.training or bn.running_mean is None) and layout(x) == CHANNELS_LAST and not on_c_kernels(x):
        with torch.no_grad():
            centre = weight.flatten(1) @ centre_estimate(x)
        return pointwise(x, weight, -centre), centre
    return pointwise(x, weight), None


class PointwiseBatchNorm(torch.autograd.Function):
    """Training-mode ``batch_norm(conv1x1(x), weight, bias)``, then ReLU if asked, as one autograd
    node on the C kernels: returns ``(out, mean, invstd)`` like
    :class:`channels_last_kernels.BatchNormFunction`. The same arithmetic as :func:`pointwise`
    followed by that Function (the same matrix product, the same kernels); one node instead of
    the seven the two make (permutes, views, the product, the batch norm), whose fixed costs
    add up over the hundreds of pointwise convolutions of a supernet step. The gradients of the
    kernel and of ``x`` are skipped when the running backward pass does not need them (the
    architecture step needs no kernel gradients, nor gradients of the first cell's inputs). Double backward (``create_graph``)
    recomputes the product with differentiable operations."""

    @staticmethod
    def forward(ctx, x, conv_weight, weight, bias, eps: float, relu: bool):
        y = pointwise(x, conv_weight)
        out, mean, invstd = channels_last_kernels.bn_forward(y, weight, bias, eps, relu)
        ctx.save_for_backward(x, conv_weight, y, weight, bias, mean, invstd)
        ctx.eps, ctx.relu = eps, relu
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)
        return out, mean, invstd

    @staticmethod
    def backward(ctx, grad, _mean, _invstd):
        x, conv_weight, y, weight, bias, mean, invstd = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None
        need_x, need_conv, need_w, need_b = ctx.needs_input_grad[:4]
        grad_mode = torch.is_grad_enabled()   # create_graph: y as a function of x and the kernel
        # the gradients the running backward pass will use: not the kernel's in the architecture
        # step, nor x's where that pass ends above x (the first cell's inputs)
        need_x = need_x and engine_will_need(x)
        need_conv = need_conv and (grad_mode or engine_will_need(conv_weight))
        if grad_mode:
            y = pointwise(x, conv_weight)
            gy, gw, gb = channels_last_kernels.differentiable_backward(
                grad, y, weight, bias, mean, invstd, ctx.eps, ctx.relu, (need_x or need_conv, need_w, need_b))
        else:
            gy, gw, gb = channels_last_kernels.bn_backward(grad, y, weight, bias, mean, invstd, ctx.relu,
                                                           (need_x or need_conv, need_w, need_b))
        gx = gconv = None
        if need_x or need_conv:
            n, c, h, wd = x.shape
            rows_g = gy.permute(0, 2, 3, 1).reshape(n * h * wd, -1)
            matrix = conv_weight.view(conv_weight.shape[0], c)
            if need_x:
                gx = (rows_g @ matrix).view(n, h, wd, c).permute(0, 3, 1, 2)
            if need_conv:
                gconv = (rows_g.t() @ x.permute(0, 2, 3, 1).reshape(n * h * wd, c)).view(conv_weight.shape)
        return gx, gconv, gw, gb, None, None


def pointwise_batch_norm(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, stats: RunningStats,
                          scale: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """``bn(conv(x))`` for a 1x1 convolution (see :func:`centred_pointwise`), times ``scale``,
    then ReLU if ``relu``: one :class:`PointwiseBatchNorm` node on the C kernels in train mode."""
    is_pointwise = conv.bias is None and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.kernel_size == (1, 1)
    if (is_pointwise and bn.training and layout(x) == CHANNELS_LAST and on_c_kernels(x) and x.dtype == conv.weight.dtype
            and conv.weight.is_contiguous()):
        weight, bias = scaled_affine(bn, scale)
        out, mean, invstd = PointwiseBatchNorm.apply(x, conv.weight, weight, bias, bn.eps, relu)
        stats.add([bn], mean, invstd, out.numel() // out.shape[1])
        return out
    if is_pointwise:
        y, centre = centred_pointwise(x, conv.weight, bn)
        return batch_norm(y, bn, stats, scale=scale, centre=centre, relu=relu)
    return batch_norm(conv(x), bn, stats, scale=scale, relu=relu)

