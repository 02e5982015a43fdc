"""channels_last tensors in the fast networks: their layout, and the autograd nodes that keep
their gradients densely laid out.

Every activation of :mod:`nbutils.accel.fast_supernet` and :mod:`nbutils.accel.fast_network`
is channels_last (oneDNN's depthwise convolutions, pools and batch norm are much faster in NHWC
than in NCHW, and the C kernels of :mod:`nbutils.accel.channels_last_kernels` take NHWC only).
PyTorch's autograd hands on some gradients strided or in the other layout (a channel slice of a
concatenation's gradient, a slice's zero-filled NCHW gradient), and the kernels that read them
then run slower generic code: :class:`DenseGrad` and :class:`EvenOdd` hand them on dense.
"""
from __future__ import annotations

import torch

from . import channels_last_kernels

__all__ = ["CHANNELS_LAST", "layout", "on_c_kernels", "engine_will_need", "DenseGrad", "EvenOdd"]

#: The memory format of the fast networks' activations.
CHANNELS_LAST = torch.channels_last


def layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format ``x`` is dense in: channels_last, or the default."""
    if x.is_contiguous(memory_format=CHANNELS_LAST) and not x.is_contiguous():
        return CHANNELS_LAST
    return torch.contiguous_format


def on_c_kernels(x: torch.Tensor) -> bool:
    """Whether a training-mode batch norm of ``x`` (or of a 1x1 convolution of it) runs on the
    C kernels of :mod:`nbutils.accel.channels_last_kernels`."""
    return channels_last_kernels.applies(x)


def engine_will_need(t: torch.Tensor) -> bool:
    """Whether the running backward pass will use a gradient for ``t``: ``loss.backward(
    inputs=alphas)`` needs no weight gradients, and native convolutions skip them then."""
    try:
        node = t.grad_fn
        if node is None:
            with torch.enable_grad():
                node = t.view_as(t).grad_fn.next_functions[0][0]   # the leaf's AccumulateGrad
        return bool(torch._C._will_engine_execute_node(node))
    except Exception:   # private API changed, or not inside the engine: compute it
        return True


class DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on its gradient densely laid out like the input.

    A node's gradient sums what its readers send back, one of which is a channel slice of
    the cell output's gradient (the backward of ``torch.cat``). PyTorch's batch-norm backward
    runs a slower generic kernel on such a strided gradient; made dense once
    per node, the gradient of every operation output summed into the node (the same tensor)
    is dense too, and each batch norm runs the fast channels_last kernel.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.layout = layout(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.layout)


class EvenOdd(torch.autograd.Function):
    """``(x[:, :, ::2, ::2], x[:, :, 1::2, 1::2])``, each laid out densely like ``x``.

    The pixels FactorizedReduce's two stride-2 1x1 convolutions read (the second on ``x``
    shifted by one pixel), and the only pixels a stride-2 dilation-2 "same" convolution reads.
    The backward writes both gradients into one tensor laid out like ``x``: autograd's own
    slice backward zero-fills a full NCHW tensor per slice, and adding it to the
    channels_last gradients from ``x``'s other readers runs a slow mixed-layout kernel.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.layout = x.shape, layout(x)
        ctx.set_materialize_grads(False)
        return x[:, :, ::2, ::2].contiguous(memory_format=ctx.layout), x[:, :, 1::2, 1::2].contiguous(memory_format=ctx.layout)

    @staticmethod
    def backward(ctx, even, odd):
        some = even if even is not None else odd
        if some is None:
            return None
        grad = torch.empty(ctx.shape, dtype=some.dtype, device=some.device, memory_format=ctx.layout)
        for (rows, cols), part in (((0, 0), even), ((1, 1), odd), ((0, 1), None), ((1, 0), None)):
            view = grad[:, :, rows::2, cols::2]
            view.zero_() if part is None else view.copy_(part)
        return grad
