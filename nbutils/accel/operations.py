"""The DARTS operations of the fast networks, from the channels_last pieces: each computes what
its module in :mod:`nbutils.space.ops` computes, from what the operations reading one state
share (the state's ReLU, its even and odd pixels, the output of the first depthwise
convolution), with its batch norms on :mod:`nbutils.accel.batch_norm` and their running
statistics collected in a :class:`~nbutils.accel.batch_norm.RunningStats`.

* **3x3 average pools as depthwise convolutions** with a kernel of ones, times 1 / count
  (:func:`pool`): ``avg_pool2d`` and its backward are slow on channels_last.
* **SepConv and DilConv from their first depthwise convolution** (:func:`sep_conv`,
  :func:`dil_conv`), which :func:`nbutils.accel.depthwise.depthwise_fanout` computes for every
  convolution on one state; the ReLU inside SepConv runs fused into its batch norm.
* **FactorizedReduce from the even and odd pixels** (:func:`factorized_reduce`,
  :class:`nbutils.accel.channels_last.EvenOdd`): its two stride-2 1x1 convolutions are stride-1
  convolutions of these.
* **Preprocessings from the ReLU of their input** (:func:`preprocess`): each cell output is read
  by two preprocessings (of the next two cells), which share its ReLU.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..space.ops import FactorizedReduce, ReLUConvBN
from .batch_norm import RunningStats, batch_norm, centred_pointwise, pointwise_batch_norm
from .channels_last import EvenOdd
from .depthwise import conv_module, depthwise_conv2d

__all__ = ["pool", "sep_conv", "dil_conv", "factorized_reduce", "preprocess"]


def pool(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``module(x)`` for a pooling module; DARTS' 3x3 average pool (padding 1, the padding left
    out of the count) as a depthwise convolution with a kernel of ones times 1 / count per
    pixel: on channels_last, ``avg_pool2d`` and its backward are much slower than a depthwise
    3x3 convolution (see ``benchmarks/README.md``)."""
    if (isinstance(module, nn.AvgPool2d) and not module.count_include_pad and not module.ceil_mode
            and module.divisor_override is None and _pair(module.kernel_size) == (3, 3) and _pair(module.padding) == (1, 1)
            and _pair(module.stride)[0] == _pair(module.stride)[1]):
        stride = _pair(module.stride)[0]
        ones = x.new_ones(x.shape[1], 1, 3, 3)
        return depthwise_conv2d(x, ones, stride, 1, 1) * _inverse_counts(x.shape[-2:], stride, x.dtype, x.device)
    return module(x)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@functools.lru_cache(maxsize=64)
def _inverse_counts(size: tuple[int, int], stride: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 / (number of input pixels inside each 3x3 window, padding 1), per output pixel."""
    ones = torch.ones(1, 1, *size, dtype=dtype, device=device)
    return F.conv2d(ones, torch.ones(1, 1, 3, 3, dtype=dtype, device=device), None, stride, 1).reciprocal_()


def sep_conv(d: torch.Tensor, op: nn.Sequential, stats: RunningStats, scale: torch.Tensor | None = None) -> torch.Tensor:
    """SepConv (op: ReLU, dw, pw, BN, ReLU, dw, pw, BN) from the output ``d`` of its first
    depthwise convolution on the ReLU'd input, times ``scale``."""
    t = pointwise_batch_norm(d, op[2], op[3], stats, relu=True)
    return pointwise_batch_norm(conv_module(t, op[5]), op[6], op[7], stats, scale=scale)


def dil_conv(d: torch.Tensor, op: nn.Sequential, stats: RunningStats, scale: torch.Tensor | None = None) -> torch.Tensor:
    """DilConv (op: ReLU, dw, pw, BN) from the output ``d`` of its depthwise convolution on
    the ReLU'd input, times ``scale``."""
    return pointwise_batch_norm(d, op[2], op[3], stats, scale=scale)


def factorized_reduce(halves: tuple[torch.Tensor, torch.Tensor], op: FactorizedReduce, stats: RunningStats,
                      scale: torch.Tensor | None = None) -> torch.Tensor:
    """FactorizedReduce (same arithmetic as its forward) from the even and odd pixels of its
    ReLU'd input (:class:`EvenOdd`), times ``scale``. Its stride-2 1x1 convolutions are
    stride-1 convolutions of these; an odd input size gets the reference's zero padding."""
    even, odd = halves
    if odd.shape[-2:] != even.shape[-2:]:
        odd = F.pad(odd, (0, even.shape[-1] - odd.shape[-1], 0, even.shape[-2] - odd.shape[-2]))
    y1, centre1 = centred_pointwise(even, op.conv_1.weight, op.bn)
    y2, centre2 = centred_pointwise(odd, op.conv_2.weight, op.bn)
    centre = None if centre1 is None else torch.cat([centre1, centre2])
    return batch_norm(torch.cat([y1, y2], dim=1), op.bn, stats, scale=scale, centre=centre)


def preprocess(module: nn.Module, relu_x: torch.Tensor, stats: RunningStats) -> torch.Tensor:
    """``module(x)`` for a preprocessing module, both of whose kinds start with ``ReLU``, from
    ``relu_x = ReLU(x)``: each cell output is read by two preprocessings (of the next two
    cells), which share its ReLU."""
    if isinstance(module, ReLUConvBN):
        return pointwise_batch_norm(relu_x, module[1], module[2], stats)
    if isinstance(module, FactorizedReduce):
        return factorized_reduce(EvenOdd.apply(relu_x), module, stats)
    raise TypeError(f"unexpected preprocessing module {type(module).__name__}")  # pragma: no cover
