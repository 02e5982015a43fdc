"""The NTK's per-sample gradient rows of a TE-NAS network in one ordinary backward: rows as replicas.

TE-NAS's NTK needs, for each sample ``i`` of a batch, the gradient of its summed logits
``s_i`` w.r.t. the weights, through the *batched* forward (train-mode batch norm couples the
samples). :func:`nbutils.nas.ntk.per_sample_gradients_loop` runs one backward per sample;
:func:`nbutils.nas.ntk.per_sample_gradients` vectorises the backward with ``vmap``, but on the
CPU PyTorch still runs every convolution backward once per row, and TE-NAS's networks
(``C = 1``: single-channel depthwise convolutions) spend most of their time there.

Here the rows become *replicas* instead: the network is evaluated on ``R`` copies of the
batch at once, replica ``r`` with its own copy ``W_r`` of every weight (all copies equal to
the network's weights), each replica's batch norm normalising over that replica's ``N``
samples only. Every replica therefore computes exactly the network's batched forward, and
with ``L = sum_r s_{rows[r]}(replica r)``, ``dL/dW_r`` is row ``rows[r]`` of ``G``: one
ordinary backward gives all rows. Replicas cost ``R`` times the forward, but every operation
runs once, on tensors ``R`` times larger, in layouts the CPU kernels are fast on:

* replica tensors are ``(N, R*C, H, W)`` channels_last, channel ``r*C + c`` holding channel
  ``c`` of replica ``r``: depthwise convolutions, pools and batch norm are single calls over
  ``R*C`` channels, batch norm's per-channel statistics are exactly per replica;
* a single-channel depthwise convolution followed by a single-channel 1x1 (TE-NAS's ``C = 1``
  SepConv and DilConv) is one convolution with the product of the weights; its weight
  gradient is one matrix product against the input's patches (:class:`_ReplicaDepthwise`),
  its input gradient a depthwise convolution;
* other 1x1 convolutions are one matrix product with a block-diagonal weight; stride-2
  reads of even or odd pixels keep a channels_last gradient (:class:`_Subsample`);
* the ReLU that several operations of an edge apply to the same state is computed once.

Faster than the loop and than vmap from 16x16 images on; on smaller images vmap is faster,
and ``method="auto"`` keeps vmap there (``benchmarks/ntk_speed.py``; figures, and the layouts
tried and dropped, in ``benchmarks/README.md``).
Equal to the loop to float tolerance (``tests/test_ntk_replicas.py`` checks 1e-9 in float64).
Supports the modules TE-NAS's networks are built from (:class:`~nbutils.nas.tenas_network.TenasNetwork`
and its cells and operations); :func:`supports_replicas` says whether a network qualifies.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..accel.depthwise import depthwise_conv2d, depthwise_input_grad
from ..space.genotype import STEPS
from ..space.ops import FactorizedReduce, Identity
from .tenas_network import CELL_TYPES, TenasCell, TenasNetwork

__all__ = ["replica_gradients", "supports_replicas"]

_CL = torch.channels_last
_LEAF_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, Identity)


def supports_replicas(network: nn.Module) -> bool:
    """Whether :func:`replica_gradients` can evaluate ``network``: a TE-NAS network built only
    from the modules it knows (convolutions without bias, 2-D batch norm, ReLU, 3x3 pools)."""

    if not isinstance(network, TenasNetwork):
        return False
    for m in network.modules():
        if isinstance(m, nn.Conv2d) and (m.bias is not None or m.padding_mode != "zeros"
                                         or m.kernel_size[0] != m.kernel_size[1]):
            return False
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and m.ceil_mode:
            return False
        if not isinstance(m, _LEAF_MODULES + (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Linear,
                                              FactorizedReduce, TenasCell, TenasNetwork)):
            return False
    return True


# --------------------------------------------------------------------------- replica tensors


def _replicas_cat(tensors: Sequence[torch.Tensor], r: int) -> torch.Tensor:
    """Concatenate replica tensors (N, R*C_i, H, W) along each replica's channels:
    (N, R*sum C_i, H, W), channels_last."""
    n, _, h, w = tensors[0].shape
    parts = [t.permute(0, 2, 3, 1).reshape(n, h, w, r, t.shape[1] // r) for t in tensors]
    out = torch.cat(parts, dim=-1)
    return out.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def _single_channel_pair(first: nn.Module, second: nn.Module) -> bool:
    """A single-channel convolution followed by a single-channel 1x1 one (TE-NAS's ``C = 1``
    SepConv and DilConv): the pair is one convolution with the product of the weights."""
    return (isinstance(first, nn.Conv2d) and isinstance(second, nn.Conv2d)
            and first.in_channels == first.out_channels == second.in_channels == second.out_channels == 1
            and second.kernel_size == (1, 1) and second.stride == (1, 1) and second.padding == (0, 0))


def _tiled(t: torch.Tensor, r: int) -> torch.Tensor:
    """(N, C, H, W) -> the replica tensor (N, R*C, H, W), channels_last, every replica ``t``."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).unsqueeze(3).expand(n, h, w, r, c).reshape(n, h, w, r * c).permute(0, 3, 1, 2)


class _ReplicaDepthwise(torch.autograd.Function):
    """Depthwise convolution of a replica tensor (N, R*C, H, W) with the replicas' weights
    (R*C, 1, k, k), using that every replica holds the same input and the same weights:

    * forward: replica 0's convolution, tiled;
    * input gradient: a depthwise convolution of the gradient (every replica's own);
    * weight gradient: ``dW[r, c] = sum_{n, p} grad[n, r, c, p] * patches(x)[n, c, :, p]``, one
      matrix product against the patches of replica 0's input (oneDNN's depthwise weight
      gradient is slow for these shapes, and the patches are the same for every replica)."""

    @staticmethod
    def forward(x, w, stride: int, padding: int, dilation: int, r: int):
        c = x.shape[1] // r
        x0 = x[:, :c].contiguous(memory_format=_CL)
        return _tiled(F.conv2d(x0, w[:c], None, stride, padding, dilation, c), r)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, stride, padding, dilation, r = inputs
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation, r)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        stride, padding, dilation, r = ctx.conf
        grad = grad.contiguous(memory_format=_CL)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = depthwise_input_grad(grad, w, x.shape, stride, padding, dilation)
        if ctx.needs_input_grad[1]:
            n, c, k = x.shape[0], x.shape[1] // r, w.shape[-1]
            patches = F.unfold(x[:, :c], k, dilation, padding, stride).reshape(n, c, k * k, -1)   # (N, C, k*k, L)
            g = grad.permute(0, 2, 3, 1).reshape(n, -1, r, c)                                   # (N, L, R, C)
            gw = torch.stack([torch.bmm(patches[:, j], g[..., j]).sum(0).T for j in range(c)], dim=1)   # (R, C, k*k)
            gw = gw.reshape(w.shape)
        return gx, gw, None, None, None, None


class _Subsample(torch.autograd.Function):
    """``x[..., offset::2, offset::2]`` as a channels_last tensor, with a channels_last
    gradient (slicing's own backward scatters into a default-layout tensor of zeros, and every
    operation downstream of a layout mismatch runs slower)."""

    @staticmethod
    def forward(x, offset: int):
        return x[..., offset::2, offset::2].contiguous(memory_format=_CL)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, offset = inputs
        ctx.shape, ctx.offset = x.shape, offset

    @staticmethod
    def backward(ctx, grad):
        n, c, h, w = ctx.shape
        full = grad.new_zeros(n, h, w, c).permute(0, 3, 1, 2)
        full[..., ctx.offset::2, ctx.offset::2] = grad
        return full, None


class _ReplicaBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of replica tensors (N, R*C, H, W), channels_last.

    Every replica holds the same values, so the batch statistics are computed on replica 0
    alone, accurately (a float32 channels_last batch norm sums with a large error, see
    :func:`nbutils.accel.batch_norm.batch_norm`), and the normalisation is one elementwise pass;
    the backward is PyTorch's training-mode batch-norm backward with those statistics (it
    centres on the given mean, so its sums do not cancel), per replica and channel."""

    @staticmethod
    def forward(x, weight, bias, eps: float, r: int):
        c = x.shape[1] // r
        var, mean = torch.var_mean(x[:, :c], dim=(0, 2, 3), correction=0)
        mean, var = mean.repeat(r), var.repeat(r)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps), mean, torch.rsqrt(var + eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps, _ = inputs
        _, mean, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(ctx, grad, _mean, _invstd):
        x, weight, mean, invstd = ctx.saved_tensors
        grad = grad.contiguous(memory_format=_CL)
        need_w = weight is not None and ctx.needs_input_grad[1]
        gx, gw, _ = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, [ctx.needs_input_grad[0], need_w, False])
        return gx, (gw if need_w else None), None, None, None


class _Replicas:
    """Per-replica copies of the network's NTK weights and the operations on replica tensors:
    (N, R*C, H, W) channels_last, channel ``r*C + c`` holding channel ``c`` of replica ``r``."""

    def __init__(self, network: nn.Module, r: int):
        self.r = r
        self.leaves: dict[int, torch.Tensor] = {}
        for name, p in network.named_parameters():
            if "weight" in name and p.requires_grad:
                self.leaves[id(p)] = p.detach().unsqueeze(0).expand(r, *p.shape).requires_grad_()

    def weight(self, p: torch.Tensor) -> torch.Tensor:
        """Replica copies (R, ...) of ``p`` (dense: kernels given a stride-0 weight may misread
        it; torch 2.14's channels_last batch-norm backward does), or ``p`` copied to them if
        it is not an NTK weight."""
        leaf = self.leaves.get(id(p))
        return (leaf if leaf is not None else p.detach().unsqueeze(0).expand(self.r, *p.shape)).contiguous()

    # ------------------------------------------------------------------ operations

    def conv(self, x: torch.Tensor, conv: nn.Conv2d, scale: nn.Conv2d | None = None) -> torch.Tensor:
        """``conv(x)``, or ``scale(conv(x))`` for a single-channel ``conv`` followed by a
        single-channel 1x1 ``scale``: one convolution with the product of the two weights."""
        r = self.r
        c_in, c_out = x.shape[1] // r, conv.out_channels
        w = self.weight(conv.weight)                              # (R, Cout, Cin/g, k, k)
        if scale is not None:
            w = w * self.weight(scale.weight)
        k, stride = conv.kernel_size[0], conv.stride[0]
        padding, dilation, groups = conv.padding[0], conv.dilation[0], conv.groups
        if k == 1 and groups == 1 and padding == 0:
            return self._pointwise(x, w, stride)
        ww = w.reshape(r * c_out, *w.shape[2:])
        if groups == c_in == c_out:                               # depthwise
            if stride == 2 and dilation == 2 and padding == k - 1:   # reads the even pixels only
                x, stride, padding, dilation = _Subsample.apply(x, 0), 1, padding // 2, 1
            # of three implementations, the fastest on TE-NAS's shapes (N = R = 14, C = 1 or 2)
            # for each case (see benchmarks/README.md)
            if c_in == 1:
                return _ReplicaDepthwise.apply(x, ww, stride, padding, dilation, r)
            if dilation == 1:
                return F.conv2d(x, ww, None, stride, padding, dilation, r * groups)
            return depthwise_conv2d(x, ww, stride, padding, dilation, polyphase=False, c_kernels=False)
        return F.conv2d(x, ww, None, stride, padding, dilation, r * groups)

    def _pointwise(self, x: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
        """A 1x1 convolution, one weight matrix per replica: one matrix product of the pixels
        (N*H*W, R*Cin) with the block-diagonal (R*Cin, R*Cout) matrix of the replicas' weights
        (a grouped convolution over R groups of a few channels runs group by group)."""
        r, (c_out, c_in) = self.r, w.shape[1:3]
        if stride == 2:
            x = _Subsample.apply(x, 0)
        elif stride > 1:
            x = x[..., ::stride, ::stride]
        if c_in == c_out == 1:                                  # a per-replica scale
            return x * w.reshape(1, r, 1, 1)
        n, _, h, wd = x.shape
        blocks = w.reshape(r, c_out, c_in).transpose(1, 2)                     # (R, Cin, Cout)
        eye = torch.eye(r, dtype=w.dtype, device=w.device)
        diagonal = (eye[:, None, :, None] * blocks[:, :, None, :]).reshape(r * c_in, r * c_out)
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * wd, r * c_in)
        return (pixels @ diagonal).reshape(n, h, wd, r * c_out).permute(0, 3, 1, 2)

    def batch_norm(self, x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        """Training-mode batch norm of each replica over its own batch."""
        weight = None if bn.weight is None else self.weight(bn.weight).reshape(-1)
        bias = None if bn.bias is None else bn.bias.detach().repeat(self.r)     # not an NTK weight
        return _ReplicaBatchNorm.apply(x, weight, bias, bn.eps, self.r)[0]

    def pool(self, x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
        if isinstance(pool, nn.MaxPool2d):
            return F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation)
        return F.avg_pool2d(x, pool.kernel_size, pool.stride, pool.padding, False,
                            pool.count_include_pad, pool.divisor_override)

    def apply(self, module: nn.Module, x: torch.Tensor, relu_x: torch.Tensor | None = None) -> torch.Tensor:
        """``module(x)`` on replica tensors; ``relu_x``, if given, is ``F.relu(x)``, for modules
        that start with a ReLU (shared by the operations of an edge)."""
        if isinstance(module, nn.Sequential):
            children = list(module)
            if relu_x is not None and children and isinstance(children[0], nn.ReLU):
                x, children = relu_x, children[1:]
            i = 0
            while i < len(children):
                if i + 1 < len(children) and _single_channel_pair(children[i], children[i + 1]):
                    x = self.conv(x, children[i], scale=children[i + 1])
                    i += 2
                else:
                    x = self.apply(children[i], x)
                    i += 1
            return x
        if isinstance(module, nn.ReLU):
            return F.relu(x)
        if isinstance(module, nn.Conv2d):
            return self.conv(x, module)
        if isinstance(module, nn.BatchNorm2d):
            return self.batch_norm(x, module)
        if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            return self.pool(x, module)
        if isinstance(module, Identity):
            return x
        if isinstance(module, FactorizedReduce):
            x = F.relu(x) if relu_x is None else relu_x
            if x.shape[-1] % 2 or x.shape[-2] % 2:
                shifted = F.pad(x[..., 1:, 1:], (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
                halves = [self.conv(x, module.conv_1), self.conv(shifted, module.conv_2)]
            else:   # the two stride-2 1x1 convolutions read the even and the odd pixels
                halves = [self._pointwise(_Subsample.apply(x, offset), self.weight(conv.weight), 1)
                          for offset, conv in ((0, module.conv_1), (1, module.conv_2))]
            halves = _replicas_cat(halves, self.r)
            return self.batch_norm(halves, module.bn)
        raise TypeError(f"no replica evaluation for {type(module).__name__}")  # pragma: no cover

    def cell(self, cell: nn.Module, s0: torch.Tensor, s1: torch.Tensor, removed) -> torch.Tensor:
        """:meth:`nbutils.nas.tenas_network.TenasCell.forward` on replica tensors; the ReLU that every
        operation but the pools applies to a state is computed once per state."""
        relus: dict[int, torch.Tensor] = {}

        def run(module: nn.Module, h: torch.Tensor, j: int | None) -> torch.Tensor:
            if j is None:
                return self.apply(module, h)
            if j not in relus:
                relus[j] = F.relu(h)
            return self.apply(module, h, relus[j])

        return _replicas_cat(cell.states(s0, s1, removed, run)[-STEPS:], self.r)

    def summed_logits(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """:meth:`nbutils.nas.tenas_network.TenasNetwork.forward` on the replicas: ``s`` (N, R), the summed
        logits of every sample in every replica."""

        by_cell = {kind: frozenset((e, op) for c, e, op in network.removed if c == kind) for kind in CELL_TYPES}
        x = x.contiguous(memory_format=_CL)
        if network.stem is not None:
            conv, bn = network.stem       # the input is the same for every replica: one convolution
            w = self.weight(conv.weight)
            s = F.conv2d(x, w.reshape(-1, *w.shape[2:]), None, conv.stride, conv.padding, conv.dilation, conv.groups)
            s = self.batch_norm(s, bn)
        else:
            s = x.repeat(1, self.r, 1, 1)
        s0 = s1 = s
        for cell in network.cells:
            s0, s1 = s1, self.cell(cell, s0, s1, by_cell["reduce" if cell.reduction else "normal"])
        features = self.apply(network.lastact, s1).mean(dim=(2, 3))            # (N, R*C)
        lin = network.classifier
        features = features.reshape(features.shape[0], self.r, -1)
        logits = torch.einsum("nrc,rkc->nrk", features, self.weight(lin.weight))
        if lin.bias is not None:
            logits = logits + lin.bias
        return logits.sum(-1)


def replica_gradients(network: nn.Module, batch: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
    """Rows ``G[i] = d(sum_k f_ik)/dW`` for the samples ``rows`` (default: all) of ``batch``,
    through the network's train-mode batched forward, in one backward (see the module
    docstring). ``W``: every parameter whose name contains ``'weight'``, requires grad and
    receives a gradient, in ``named_parameters`` order, as
    :func:`nbutils.nas.ntk.per_sample_gradients_loop`. The network must be in the state the
    caller wants measured (train mode); it is only read."""
    if not supports_replicas(network):
        raise TypeError(f"replica_gradients supports TE-NAS networks only, got {type(network).__name__}")
    if any(not m.training for m in network.modules() if isinstance(m, nn.BatchNorm2d)):
        raise ValueError("replica_gradients evaluates batch norm in training mode (batch statistics): put the "
                         "network in training mode (nbutils.nas.ntk.per_sample_gradients does)")
    n = batch.shape[0]
    rows = list(range(n)) if rows is None else [int(i) for i in rows]
    reps = _Replicas(network, len(rows))
    summed = reps.summed_logits(network, batch)                              # (N, R)
    objective = summed[torch.tensor(rows), torch.arange(len(rows))].sum()
    leaves = list(reps.leaves.values())
    grads = torch.autograd.grad(objective, leaves, allow_unused=True)
    return torch.cat([g.reshape(len(rows), -1) for g in grads if g is not None], dim=1).detach()
