"""Depthwise convolution for the fast networks: the C kernels on channels_last CPU tensors, else
oneDNN's forward with a faster hand-written backward; and the fan-out of the depthwise
convolutions that read one tensor through one autograd node.

* **The C kernels** (:func:`channels_last_kernels.depthwise_forward` and its two gradients): at
  a CPU search's sizes oneDNN's depthwise convolution costs mostly its fixed per-call overhead,
  and its backward is slow for most depthwise shapes; the C kernels loop over each row's pixels
  and channels contiguously and accumulate the input gradients of a fan-out in place. Double
  backward (``create_graph``) and tensors the kernels do not take (no C compiler, NCHW) use
  oneDNN with the backward below.
* **A hand-written backward** (:class:`DepthwiseConv`, where the C kernels do not apply):
  oneDNN's own backward is slow for most depthwise shapes (the input gradient of a dilated 3x3
  and the weight gradient of a 5x5 cost many times their forward). The input gradient is
  computed as a forward depthwise convolution of the output gradient with the flipped kernel
  (stride 1) or as a transposed convolution (stride 2); the weight gradient of a dilation-2
  kernel is computed on the four polyphase sub-images (where the kernel is undilated, a case
  oneDNN does fast), and the weight gradient of a 5x5 kernel as four 3x3 weight gradients on
  shifted windows. The weight gradient is skipped when the running backward pass does not
  need it (``loss.backward(inputs=alphas)``), as native convolutions do. It is written with
  differentiable operations, so double backward works.
* **One node for the convolutions that read one tensor** (:class:`DepthwiseFanout`), which sums
  their input gradients in place (the engine adds a channels_last tensor's gradients out of
  place, a fresh tensor per reader); their weight gradients share the copies of the input they
  read (:class:`Prepared`: polyphase sub-images, padded windows), made once instead of once
  per convolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import channels_last_kernels
from .channels_last import engine_will_need, layout

__all__ = ["depthwise_conv2d", "depthwise_input_grad", "weight_grad", "native_grads", "polyphase_split", "Prepared",
           "DepthwiseConv", "DepthwiseFanout", "conv_module", "reads_even_pixels", "depthwise_fanout"]


def native_grads(grad, x, w, stride, padding, dilation, mask):
    """oneDNN's ``convolution_backward`` of a depthwise convolution; ``mask``: which of
    (input, weight, bias) gradients to compute."""
    return torch.ops.aten.convolution_backward(
        grad, x, w, None, [stride, stride], [padding, padding], [dilation, dilation], False, [0, 0], x.shape[1], mask
    )


def polyphase_split(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W), H and W even -> (4N, C, H/2, W/2): the four (row parity, column parity)
    sub-images stacked along the batch, channels_last."""
    n, c, h, w = t.shape
    t = t.permute(0, 2, 3, 1).reshape(n, h // 2, 2, w // 2, 2, c).permute(2, 4, 0, 1, 3, 5)
    return t.reshape(4 * n, h // 2, w // 2, c).permute(0, 3, 1, 2)


class Prepared:
    """A depthwise convolution's input with the copies of it that weight gradients read, made
    once: :class:`DepthwiseFanout` computes the weight gradients of up to 16 convolutions
    of one input, and those of the same kind read the same polyphase sub-images and the same
    windows of the padded input."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self._polyphase: Prepared | None = None
        self._windows: dict | None = None

    def polyphase(self) -> Prepared:
        """The four parity sub-images (:func:`polyphase_split`), prepared in turn."""
        if self._polyphase is None:
            self._polyphase = Prepared(polyphase_split(self.x))
        return self._polyphase

    def windows(self) -> dict[tuple[int, int], torch.Tensor]:
        """The four (H + 2) x (W + 2) windows of the input padded by 2, at offsets 0 and 2
        in each direction, laid out densely."""
        if self._windows is None:
            h, w = self.x.shape[-2:]
            padded = F.pad(self.x, (2, 2, 2, 2))
            dense = layout(self.x)
            self._windows = {(oh, ow): padded[:, :, oh: oh + h + 2, ow: ow + w + 2].contiguous(memory_format=dense)
                             for oh in (0, 2) for ow in (0, 2)}
        return self._windows


def weight_grad(x: Prepared, grad: torch.Tensor, k: int, stride: int, padding: int, dilation: int,
                use_polyphase: bool = True) -> torch.Tensor:
    """d loss / d weight of a depthwise convolution (weight C x 1 x k x k) of ``x.x`` on oneDNN:
    on the polyphase sub-images for a dilation-2 kernel (``use_polyphase``), as four 3x3 weight
    gradients for a 5x5 kernel."""
    c = x.x.shape[1]
    same = stride == 1 and 2 * padding == dilation * (k - 1)
    if use_polyphase and same and dilation == 2 and x.x.shape[-1] % 2 == 0 and x.x.shape[-2] % 2 == 0:
        # a dilation-2 kernel sees each parity sub-image separately, undilated
        return weight_grad(x.polyphase(), polyphase_split(grad), k, 1, padding // 2, 1)
    if same and dilation == 1 and k == 5:
        # four 3x3 weight gradients on shifted windows of the padded input
        probe = grad.new_empty(c, 1, 3, 3)
        blocks = {offset: native_grads(grad, window, probe, 1, 0, 1, [False, True, False])[1]
                  for offset, window in x.windows().items()}
        top = torch.cat([blocks[0, 0], blocks[0, 2][..., 1:]], dim=-1)
        bottom = torch.cat([blocks[2, 0], blocks[2, 2][..., 1:]], dim=-1)
        return torch.cat([top, bottom[..., 1:, :]], dim=-2)
    probe = grad.new_empty(c, 1, k, k)
    return native_grads(grad, x.x, probe, stride, padding, dilation, [False, True, False])[1]


def depthwise_input_grad(grad: torch.Tensor, w: torch.Tensor, x_shape, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """d loss / d input of a depthwise convolution, itself a depthwise convolution."""
    c, k = w.shape[0], w.shape[-1]
    if stride == 1 and 2 * padding == dilation * (k - 1):
        return F.conv2d(grad, w.flip(-1, -2), None, 1, padding, dilation, c)
    extra = [x_shape[i] - ((grad.shape[i] - 1) * stride - 2 * padding + dilation * (k - 1) + 1) for i in (2, 3)]
    return F.conv_transpose2d(grad, w, None, stride, padding, extra, c, dilation)


def _forward(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, dilation: int, in_c: bool) -> torch.Tensor:
    """``F.conv2d(x, w, None, stride, padding, dilation, groups=C)`` inside an autograd
    Function's forward (grad mode off): on the C kernels if ``in_c``
    (:func:`channels_last_kernels.depthwise_applies`, decided once per convolution: the
    Functions keep the answer for their backward, which runs on the same tensors)."""
    if in_c:
        return channels_last_kernels.depthwise_forward(x, w, stride, padding, dilation)
    return F.conv2d(x, w, None, stride, padding, dilation, x.shape[1])


class DepthwiseConv(torch.autograd.Function):
    """Depthwise 2-D convolution (groups = channels, no bias) with a faster CPU backward (see
    the module docstring). The backward is written with differentiable operations, so double
    backward works."""

    @staticmethod
    def forward(ctx, x, w, stride: int, padding: int, dilation: int, use_polyphase: bool, in_c: bool):
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation, use_polyphase)
        ctx.in_c = in_c
        return _forward(x, w, stride, padding, dilation, in_c)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        stride, padding, dilation, use_polyphase = ctx.conf
        grad = grad.contiguous(memory_format=layout(x))
        in_c = ctx.in_c and not torch.is_grad_enabled()   # double backward: differentiable operations
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (channels_last_kernels.depthwise_input_grad(grad, w, x.shape, stride, padding, dilation) if in_c else
                  depthwise_input_grad(grad, w, x.shape, stride, padding, dilation))
        if ctx.needs_input_grad[1] and engine_will_need(w):
            gw = (channels_last_kernels.depthwise_weight_grad(x, grad, w.shape[-1], stride, padding, dilation) if in_c
                  else weight_grad(Prepared(x), grad, w.shape[-1], stride, padding, dilation, use_polyphase))
        return gx, gw, None, None, None, None, None


def depthwise_conv2d(x: torch.Tensor, w: torch.Tensor, stride: int = 1, padding: int = 0, dilation: int = 1,
                     polyphase: bool = True, c_kernels: bool = True) -> torch.Tensor:
    """``F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=C)``, square
    kernel, on the C kernels where they apply (``c_kernels``), else oneDNN with the faster
    backward: there a stride-2 dilation-2 "same" convolution is computed as a stride-1
    undilated one on the even pixels (the only ones it reads), and ``polyphase=False``
    computes a dilated kernel's weight gradient directly (faster for few channels and small
    batches). :mod:`nbutils.nas.ntk_replicas` passes ``c_kernels=False``: it is tuned on
    oneDNN's convolutions, and its results stay those of that code."""
    k = w.shape[-1]
    in_c = c_kernels and channels_last_kernels.depthwise_applies(x, w)
    if stride == 2 and dilation == 2 and padding == k - 1 and not in_c:
        return DepthwiseConv.apply(x[:, :, ::2, ::2], w, 1, padding // 2, 1, polyphase, False)
    return DepthwiseConv.apply(x, w, stride, padding, dilation, polyphase, in_c)


def conv_module(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a depthwise ``nn.Conv2d`` without bias, by :func:`depthwise_conv2d`."""
    return depthwise_conv2d(x, conv.weight, conv.stride[0], conv.padding[0], conv.dilation[0])


class DepthwiseFanout(torch.autograd.Function):
    """Several stride-1 depthwise convolutions of one input, as :class:`DepthwiseConv` each;
    the backward sums their input gradients in place. (PyTorch's autograd engine adds the
    gradients of a channels_last tensor's readers out of place, a fresh tensor per reader,
    and the ReLU of a state feeds up to 16 of these convolutions.)
    """

    @staticmethod
    def forward(ctx, x, confs, *weights):
        ctx.save_for_backward(x, *weights)
        ctx.confs = confs
        ctx.in_c = [channels_last_kernels.depthwise_applies(x, w) for w in weights]
        ctx.set_materialize_grads(False)
        return tuple(_forward(x, w, 1, padding, dilation, in_c)
                     for (padding, dilation), w, in_c in zip(confs, weights, ctx.in_c))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        dense = layout(x)
        prepared = Prepared(x)
        gx = None
        gws = [None] * len(weights)
        grad_mode = torch.is_grad_enabled()   # double backward: differentiable operations
        for i, (grad, w, (padding, dilation)) in enumerate(zip(grads, weights, ctx.confs)):
            if grad is None:
                continue
            grad = grad.contiguous(memory_format=dense)
            in_c = ctx.in_c[i] and not grad_mode
            if ctx.needs_input_grad[0]:
                if in_c:   # summed into gx in the kernel
                    gx = channels_last_kernels.depthwise_input_grad(grad, w, x.shape, 1, padding, dilation, out=gx)
                else:
                    g = depthwise_input_grad(grad, w, x.shape, 1, padding, dilation)
                    gx = g if gx is None else gx.add_(g)
            if ctx.needs_input_grad[2 + i] and engine_will_need(w):
                gws[i] = (channels_last_kernels.depthwise_weight_grad(x, grad, w.shape[-1], 1, padding, dilation)
                          if in_c else weight_grad(prepared, grad, w.shape[-1], 1, padding, dilation))
        return gx, None, *gws


def reads_even_pixels(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` (stride 2, dilation 2, "same" padding) reads only the even pixels."""
    return conv.stride == (2, 2) and conv.dilation == (2, 2) and conv.padding[0] == conv.kernel_size[0] - 1


def depthwise_fanout(x: torch.Tensor, convs: list[nn.Conv2d], on_even: bool = False) -> list[torch.Tensor]:
    """``[conv_module(x, conv) for conv in convs]``, through :class:`DepthwiseFanout` when it can.
    ``on_even``: ``x`` holds the even pixels of the convolutions' input, which all satisfy
    :func:`reads_even_pixels`: each is a stride-1 undilated convolution of ``x``."""
    if on_even:
        specs = [(c.weight, 1, c.padding[0] // 2, 1) for c in convs]
    else:
        specs = [(c.weight, c.stride[0], c.padding[0], c.dilation[0]) for c in convs]
    if len(specs) > 1 and all(stride == 1 for _, stride, _, _ in specs):
        confs = tuple((padding, dilation) for _, _, padding, dilation in specs)
        return list(DepthwiseFanout.apply(x, confs, *(w for w, *_ in specs)))
    return [depthwise_conv2d(x, w, stride, padding, dilation) for w, stride, padding, dilation in specs]
