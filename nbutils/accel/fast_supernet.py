"""A faster DARTS supernet on CPU: the same function, the same parameters as ``SuperNet``.

``FastSuperNet`` subclasses :class:`nbutils.space.supernet.SuperNet` and keeps every module,
parameter and buffer of it (``state_dict`` is interchangeable both ways); only the forward
computation is rewritten. It reads the weights from the same submodules at every call, so
``torch.func.functional_call`` and optimisers see exactly the plain parameters.

What makes it faster (``benchmarks/supernet_speed.py`` measures it; the figures, and the
alternatives tried and dropped, are in ``benchmarks/README.md``):

* **channels_last** activations throughout: oneDNN's depthwise convolutions, pools and
  batch norm are much faster in NHWC than in NCHW.
* **batch norm in C** (:mod:`nbutils.accel.channels_last_kernels`, built on first use): faster
  forward and backward than PyTorch's channels_last kernels, the ReLU inside SepConv fused
  into both, statistics summed accurately enough that the input need not be centred (see
  Accuracy); the backward of the scaled adds (below) is one C pass too. Without a C
  compiler, PyTorch's kernels run instead, with the centring.
* **depthwise convolution in C** (:func:`channels_last_kernels.depthwise_forward` and its two
  gradients, in :class:`_DepthwiseConv` and :class:`_DepthwiseFanout`) on channels_last CPU
  tensors: at a CPU search's sizes oneDNN's depthwise convolution costs mostly its fixed
  per-call overhead, and its backward is slow for most depthwise shapes (below); the C
  kernels loop over each row's pixels and channels contiguously and accumulate the input
  gradients of a fan-out in place. Double backward (``create_graph``) and tensors the kernels
  do not take (no C compiler, NCHW) use oneDNN with the backward below.
* **depthwise convolution with a hand-written backward** (:class:`_DepthwiseConv`, where the
  C kernels do not apply): oneDNN's own backward is slow for most depthwise shapes (the
  input gradient of a dilated 3x3 and the weight gradient of a 5x5 cost many times their
  forward). The input gradient is
  computed as a forward depthwise convolution of the output gradient with the flipped kernel
  (stride 1) or as a transposed convolution (stride 2); the weight gradient of a dilation-2
  kernel is computed on the four polyphase sub-images (where the kernel is undilated, a case
  oneDNN does fast), and the weight gradient of a 5x5 kernel as four 3x3 weight gradients on
  shifted windows. The weight gradient is skipped when the running backward pass does not
  need it (``loss.backward(inputs=alphas)``), as native convolutions do.
* **work shared between the edges that read the same state**: the ``none`` operation is
  skipped (it contributes exactly zero and its column of d loss / d weights is zero, so the
  alpha gradients are unchanged: the softmax still runs over every column); ``ReLU(x)`` is
  computed once per state for every convolution and FactorizedReduce on its edges; a pool
  and its (affine-free) training-mode BN depend only on the state, so they are computed
  once per state and kind, and every edge's BN module gets the running-stat update it would
  get from its own forward.
* **one autograd node for the depthwise convolutions that read one ReLU'd state**
  (:class:`_DepthwiseFanout`), which sums their input gradients in place (the engine adds a
  channels_last tensor's gradients out of place, a fresh tensor per reader); their weight
  gradients share the copies of the input they read (:class:`_Prepared`: polyphase
  sub-images, padded windows), made once instead of once per convolution.
* **even and odd pixels through one node** (:class:`_EvenOdd`): FactorizedReduce's two
  stride-2 1x1 convolutions read ``x[::2, ::2]`` and ``x[1::2, 1::2]``, and a stride-2
  dilation-2 convolution reads only the even pixels, so these are taken once per state and
  the convolutions run at stride 1 on them; the backward writes both gradients into one
  channels_last tensor (autograd's slice backward zero-fills an NCHW tensor per slice, and
  summing that with the other channels_last gradients runs a slow mixed-layout kernel).
* **architecture weights folded into the batch norms**: an operation that ends in batch
  norm (all but the identity skip) is multiplied by its weight through the kernel's affine
  weight, so ``w * BN(y)`` costs no pass of its own, and the backward kernel returns the
  alpha gradient as its weight gradient. Each cell expands its weights per channel with one
  ``unbind`` (one stack in the backward, instead of a select and a zero-filled scatter per
  operation). The node sums add these in place; the identity skips and the shared pools
  go through :class:`_AddScaled`, whose backward makes one product per input (autograd's
  ``addcmul_`` makes three).
* **one ReLU per cell output**: the next two cells' preprocessings both start with it.
* **dense node gradients** (:class:`_DenseGrad`): a node's gradient arrives partly as a
  channel slice of the cell output's gradient, on which PyTorch's batch-norm backward runs
  a slower generic kernel; it is made dense once per node.
* **a pointwise convolution and its batch norm as one autograd node** (:class:`_PointwiseBatchNorm`,
  on the C kernels): the matrix product and the batch norm of :func:`_pointwise` and
  :func:`_batch_norm`, whose views, product and batch norm otherwise make seven nodes, each
  with a fixed cost in the forward and in the backward.
* **pointwise convolutions centred through their bias** (:func:`_centred_pointwise`, for
  PyTorch's batch-norm kernel only): its accurate use on channels_last needs a centred input
  (see Accuracy); for ``BN(W x)`` the mean is ``W mean(x)``, subtracted by the convolution's
  bias, with no subtraction pass.
* **running statistics updated once per forward** (:class:`_RunningStats`): seven small
  operations per BN module, thousands per forward, become one C call
  (:func:`channels_last_kernels.running_stats_update`), or without it a handful of
  ``torch._foreach_*`` calls, on the statistics the kernel returns.
* **3x3 average pools as depthwise convolutions** with a kernel of ones, times 1 / count
  (:func:`_pool`): ``avg_pool2d`` and its backward are slow on channels_last.
* the ReLU inside SepConv runs in place on its batch norm's output; the autograd Functions
  use the ``forward(ctx, ...)`` form, because with ``setup_context`` every ``apply`` binds
  its arguments through ``inspect.signature``, a cost paid at each of the hundreds of calls
  per forward. So they do not support ``torch.func`` transforms (``vmap``, ``grad``);
  ``functional_call`` and double backward work.

Accuracy: PyTorch's channels_last batch-norm kernel accumulates its statistics in float32
with a large error (~5e-6 relative at 64 x 32 x 32 values per channel, ~1e-4 when the mean
is large against the spread, e.g. after a max pool, against ~1e-7 for the NCHW kernel);
uncorrected, float32 gradients lose accuracy against the plain network's. The C kernels sum
blocks of 16 rows in float32 and the blocks in double, shifted by the first row: ~1e-7
relative, better than PyTorch's NCHW kernel. With PyTorch's kernel, :func:`_batch_norm`
centres the input first (BN is shift-invariant) on its mean over the first images
(:func:`_centre`, within ~2% of the spread of the batch mean: any shift is exact, this one is
close enough for the sums) and adds the shift back into the running statistics; what remains
is ~1e-5 relative in float32. Either way float64 agrees with the plain network to ~1e-12.

Every piece above computes the same function as the plain network: there is no switch to turn
one off. ``benchmarks/supernet_speed.py --without PIECE`` measures the network without a piece
by patching this module in its own processes.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import channels_last_kernels
from ..space.genotype import STEPS
from ..space.ops import FactorizedReduce, ReLUConvBN
from ..space.supernet import SearchCell, SuperNet

__all__ = ["FastSuperNet", "depthwise_conv2d", "depthwise_input_grad"]

_CL = torch.channels_last
_SEP = ("sep_conv_3x3", "sep_conv_5x5")
_DIL = ("dil_conv_3x3", "dil_conv_5x5")
_POOLS = ("max_pool_3x3", "avg_pool_3x3")


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format ``x`` is dense in: channels_last, or the default."""
    return _CL if x.is_contiguous(memory_format=_CL) and not x.is_contiguous() else torch.contiguous_format


# --------------------------------------------------------------------------- depthwise convolution


def _native_grads(grad, x, w, stride, padding, dilation, mask):
    return torch.ops.aten.convolution_backward(
        grad, x, w, None, [stride, stride], [padding, padding], [dilation, dilation], False, [0, 0], x.shape[1], mask
    )


def _polyphase(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W), H and W even -> (4N, C, H/2, W/2): the four (row parity, column parity)
    sub-images stacked along the batch, channels_last."""
    n, c, h, w = t.shape
    t = t.permute(0, 2, 3, 1).reshape(n, h // 2, 2, w // 2, 2, c).permute(2, 4, 0, 1, 3, 5)
    return t.reshape(4 * n, h // 2, w // 2, c).permute(0, 3, 1, 2)


class _Prepared:
    """A depthwise convolution's input with the copies of it that weight gradients read, made
    once: :class:`_DepthwiseFanout` computes the weight gradients of up to 16 convolutions
    of one input, and those of the same kind read the same polyphase sub-images and the same
    windows of the padded input."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self._polyphase: _Prepared | None = None
        self._windows: dict | None = None

    def polyphase(self) -> _Prepared:
        """The four parity sub-images (:func:`_polyphase`), prepared in turn."""
        if self._polyphase is None:
            self._polyphase = _Prepared(_polyphase(self.x))
        return self._polyphase

    def windows(self) -> dict[tuple[int, int], torch.Tensor]:
        """The four (H + 2) x (W + 2) windows of the input padded by 2, at offsets 0 and 2
        in each direction, laid out densely."""
        if self._windows is None:
            h, w = self.x.shape[-2:]
            padded = F.pad(self.x, (2, 2, 2, 2))
            layout = _layout(self.x)
            self._windows = {(oh, ow): padded[:, :, oh: oh + h + 2, ow: ow + w + 2].contiguous(memory_format=layout)
                             for oh in (0, 2) for ow in (0, 2)}
        return self._windows


def _weight_grad(x: _Prepared, grad: torch.Tensor, k: int, stride: int, padding: int, dilation: int,
                 polyphase: bool = True) -> torch.Tensor:
    """d loss / d weight of a depthwise convolution (weight C x 1 x k x k) of ``x.x``."""
    c = x.x.shape[1]
    same = stride == 1 and 2 * padding == dilation * (k - 1)
    if polyphase and same and dilation == 2 and x.x.shape[-1] % 2 == 0 and x.x.shape[-2] % 2 == 0:
        # a dilation-2 kernel sees each parity sub-image separately, undilated
        return _weight_grad(x.polyphase(), _polyphase(grad), k, 1, padding // 2, 1)
    if same and dilation == 1 and k == 5:
        # four 3x3 weight gradients on shifted windows of the padded input
        probe = grad.new_empty(c, 1, 3, 3)
        blocks = {offset: _native_grads(grad, window, probe, 1, 0, 1, [False, True, False])[1]
                  for offset, window in x.windows().items()}
        top = torch.cat([blocks[0, 0], blocks[0, 2][..., 1:]], dim=-1)
        bottom = torch.cat([blocks[2, 0], blocks[2, 2][..., 1:]], dim=-1)
        return torch.cat([top, bottom[..., 1:, :]], dim=-2)
    probe = grad.new_empty(c, 1, k, k)
    return _native_grads(grad, x.x, probe, stride, padding, dilation, [False, True, False])[1]


def depthwise_input_grad(grad: torch.Tensor, w: torch.Tensor, x_shape, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """d loss / d input of a depthwise convolution, itself a depthwise convolution."""
    c, k = w.shape[0], w.shape[-1]
    if stride == 1 and 2 * padding == dilation * (k - 1):
        return F.conv2d(grad, w.flip(-1, -2), None, 1, padding, dilation, c)
    extra = [x_shape[i] - ((grad.shape[i] - 1) * stride - 2 * padding + dilation * (k - 1) + 1) for i in (2, 3)]
    return F.conv_transpose2d(grad, w, None, stride, padding, extra, c, dilation)


def _engine_will_need(t: torch.Tensor) -> bool:
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


def _dw_c_kernels(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a depthwise convolution of ``x`` by ``w`` runs on the C kernels
    (:func:`channels_last_kernels.depthwise_forward` and its gradients): a channels_last
    CPU tensor, and not while a graph of the backward is being recorded (double backward
    differentiates the PyTorch operations instead)."""
    return not torch.is_grad_enabled() and channels_last_kernels.depthwise_applies(x, w)


def _dw_forward(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, dilation: int,
                c_kernels: bool = True) -> torch.Tensor:
    """``F.conv2d(x, w, None, stride, padding, dilation, groups=C)`` inside an autograd
    Function's forward (grad mode off): on the C kernels where they apply, if ``c_kernels``."""
    if c_kernels and _dw_c_kernels(x, w):
        return channels_last_kernels.depthwise_forward(x, w, stride, padding, dilation)
    return F.conv2d(x, w, None, stride, padding, dilation, x.shape[1])


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise 2-D convolution (groups = channels, no bias) with a faster CPU backward.

    The backward is written with differentiable operations, so double backward works.
    """

    @staticmethod
    def forward(ctx, x, w, stride: int, padding: int, dilation: int, polyphase: bool, c_kernels: bool):
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation, polyphase)
        ctx.c_kernels = c_kernels
        return _dw_forward(x, w, stride, padding, dilation, c_kernels)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        stride, padding, dilation, polyphase = ctx.conf
        grad = grad.contiguous(memory_format=_layout(x))
        in_c = ctx.c_kernels and _dw_c_kernels(x, w)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (channels_last_kernels.depthwise_input_grad(grad, w, x.shape, stride, padding, dilation) if in_c else
                  depthwise_input_grad(grad, w, x.shape, stride, padding, dilation))
        if ctx.needs_input_grad[1] and _engine_will_need(w):
            gw = (channels_last_kernels.depthwise_weight_grad(x, grad, w.shape[-1], stride, padding, dilation) if in_c
                  else _weight_grad(_Prepared(x), grad, w.shape[-1], stride, padding, dilation, polyphase))
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
        return _DepthwiseConv.apply(x[:, :, ::2, ::2], w, 1, padding // 2, 1, polyphase, c_kernels)
    return _DepthwiseConv.apply(x, w, stride, padding, dilation, polyphase, c_kernels)


def _dw(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return depthwise_conv2d(x, conv.weight, conv.stride[0], conv.padding[0], conv.dilation[0])


class _DepthwiseFanout(torch.autograd.Function):
    """Several stride-1 depthwise convolutions of one input, as :class:`_DepthwiseConv` each;
    the backward sums their input gradients in place. (PyTorch's autograd engine adds the
    gradients of a channels_last tensor's readers out of place, a fresh tensor per reader,
    and the ReLU of a state feeds up to 16 of these convolutions.)
    """

    @staticmethod
    def forward(ctx, x, confs, *weights):
        ctx.save_for_backward(x, *weights)
        ctx.confs = confs
        ctx.set_materialize_grads(False)
        return tuple(_dw_forward(x, w, 1, padding, dilation) for (padding, dilation), w in zip(confs, weights))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        layout = _layout(x)
        prepared = _Prepared(x)
        gx = None
        gws = [None] * len(weights)
        for i, (grad, w, (padding, dilation)) in enumerate(zip(grads, weights, ctx.confs)):
            if grad is None:
                continue
            grad = grad.contiguous(memory_format=layout)
            in_c = _dw_c_kernels(x, w)
            if ctx.needs_input_grad[0]:
                if in_c:   # summed into gx in the kernel
                    gx = channels_last_kernels.depthwise_input_grad(grad, w, x.shape, 1, padding, dilation, out=gx)
                else:
                    g = depthwise_input_grad(grad, w, x.shape, 1, padding, dilation)
                    gx = g if gx is None else gx.add_(g)
            if ctx.needs_input_grad[2 + i] and _engine_will_need(w):
                gws[i] = (channels_last_kernels.depthwise_weight_grad(x, grad, w.shape[-1], 1, padding, dilation)
                          if in_c else _weight_grad(prepared, grad, w.shape[-1], 1, padding, dilation))
        return gx, None, *gws


def _reads_even_pixels(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` (stride 2, dilation 2, "same" padding) reads only the even pixels."""
    return conv.stride == (2, 2) and conv.dilation == (2, 2) and conv.padding[0] == conv.kernel_size[0] - 1


def _depthwise_fanout(x: torch.Tensor, convs: list[nn.Conv2d], on_even: bool = False) -> list[torch.Tensor]:
    """``[_dw(x, conv) for conv in convs]``, through :class:`_DepthwiseFanout` when it can.
    ``on_even``: ``x`` holds the even pixels of the convolutions' input, which all satisfy
    :func:`_reads_even_pixels`: each is a stride-1 undilated convolution of ``x``."""
    if on_even:
        specs = [(c.weight, 1, c.padding[0] // 2, 1) for c in convs]
    else:
        specs = [(c.weight, c.stride[0], c.padding[0], c.dilation[0]) for c in convs]
    if len(specs) > 1 and all(stride == 1 for _, stride, _, _ in specs):
        confs = tuple((padding, dilation) for _, _, padding, dilation in specs)
        return list(_DepthwiseFanout.apply(x, confs, *(w for w, *_ in specs)))
    return [depthwise_conv2d(x, w, stride, padding, dilation) for w, stride, padding, dilation in specs]


class _EvenOdd(torch.autograd.Function):
    """``(x[:, :, ::2, ::2], x[:, :, 1::2, 1::2])``, each laid out densely like ``x``.

    The pixels FactorizedReduce's two stride-2 1x1 convolutions read (the second on ``x``
    shifted by one pixel), and the only pixels a stride-2 dilation-2 "same" convolution reads.
    The backward writes both gradients into one tensor laid out like ``x``: autograd's own
    slice backward zero-fills a full NCHW tensor per slice, and adding it to the
    channels_last gradients from ``x``'s other readers runs a slow mixed-layout kernel.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.layout = x.shape, _layout(x)
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



# --------------------------------------------------------------------------- cell forward


class _NodeSum:
    """The weighted sum of the operation outputs that make one node."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None

    def add_owned(self, weighted: torch.Tensor) -> None:
        """Add ``weighted``, an operation output already times its weight that nothing else
        reads (so it may become the accumulator)."""
        self.total = weighted if self.total is None else self.total.add_(weighted)

    def add(self, scale: torch.Tensor, value: torch.Tensor) -> None:
        """Add ``scale * value``, ``scale`` per channel."""
        self.total = _AddScaled.apply(self.total, value, scale)

    def state(self, dense_grad: bool) -> torch.Tensor:
        """The node's tensor; ``dense_grad``: hand its gradient on densely laid out."""
        return _DenseGrad.apply(self.total) if dense_grad and self.total.requires_grad else self.total


class _AddScaled(torch.autograd.Function):
    """``total.addcmul_(value, scale)`` with ``scale`` per channel, or ``value * scale`` when
    ``total`` is None. Its backward makes ``grad * scale`` and the per-channel sums of
    ``grad * value`` in one pass of a C kernel (:func:`channels_last_kernels.scaled_add_backward`),
    or one full-size product per input (autograd's own ``addcmul_`` backward makes three)."""

    @staticmethod
    def forward(ctx, total, value, scale):
        ctx.save_for_backward(value, scale)
        ctx.has_total = total is not None
        if total is None:
            return value * scale.view(1, -1, 1, 1)
        ctx.mark_dirty(total)
        return total.addcmul_(value, scale.view(1, -1, 1, 1))

    @staticmethod
    def backward(ctx, grad):
        value, scale = ctx.saved_tensors
        need_value, need_scale = ctx.needs_input_grad[1:]
        if _c_kernel(value) and not torch.is_grad_enabled():
            grad_value, grad_scale = channels_last_kernels.scaled_add_backward(grad, value, scale, need_value,
                                                                                need_scale)
        else:
            grad_value = grad * scale.view(1, -1, 1, 1) if need_value else None
            grad_scale = (grad * value).sum(dim=(0, 2, 3)) if need_scale else None
        return (grad if ctx.has_total else None), grad_value, grad_scale


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on its gradient densely laid out like the input.

    A node's gradient sums what its readers send back, one of which is a channel slice of
    the cell output's gradient (the backward of ``torch.cat``). PyTorch's batch-norm backward
    runs a slower generic kernel on such a strided gradient; made dense once
    per node, the gradient of every operation output summed into the node (the same tensor)
    is dense too, and each batch norm runs the fast channels_last kernel.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.layout = _layout(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.layout)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 kernel at stride 1. On a channels_last ``x`` it
    is one matrix product of the pixels' channel vectors, ``x``'s ``(N*H*W, C)`` view, with the
    kernel's ``(out, in)`` matrix, and so are its two gradients: oneDNN's 1x1 convolution pays a
    fixed cost per call that dominates at the small widths of a CPU search."""
    if _layout(x) != _CL:
        return F.conv2d(x, weight, bias)
    n, c, h, w = x.shape
    rows, matrix = x.permute(0, 2, 3, 1).reshape(n * h * w, c), weight.view(weight.shape[0], c).t()
    out = rows @ matrix if bias is None else torch.addmm(bias, rows, matrix)
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


def _centred_pointwise(x: torch.Tensor, weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.conv2d(x, weight)`` for a 1x1 kernel that ``bn`` normalises next (:func:`_pointwise`),
    and the shift it was given: when ``bn`` normalises with batch statistics and ``x`` is
    channels_last, the convolution's bias subtracts (an estimate of) its output's per-channel
    mean, ``weight @ mean(x)``. Batch norm ignores the shift, and its channels_last kernel gets
    the centred input it needs for accurate sums (see :func:`_batch_norm`) without a
    subtraction pass of its own."""
    if (bn.training or bn.running_mean is None) and _layout(x) == _CL and not _c_kernel(x):
        with torch.no_grad():
            centre = weight.flatten(1) @ _centre(x)
        return _pointwise(x, weight, -centre), centre
    return _pointwise(x, weight), None


class _PointwiseBatchNorm(torch.autograd.Function):
    """Training-mode ``batch_norm(conv1x1(x), weight, bias)``, then ReLU if asked, as one autograd
    node on the C kernels: returns ``(out, mean, invstd)`` like
    :class:`channels_last_kernels.BatchNormFunction`. The same arithmetic as :func:`_pointwise`
    followed by that Function (the same matrix product, the same kernels); one node instead of
    the seven the two make (permutes, views, the product, the batch norm), whose fixed costs
    add up over the hundreds of pointwise convolutions of a supernet step. The weight gradient
    is skipped when the running backward pass does not need it. Double backward (``create_graph``)
    recomputes the product with differentiable operations."""

    @staticmethod
    def forward(ctx, x, conv_weight, weight, bias, eps: float, relu: bool):
        y = _pointwise(x, conv_weight)
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
        if torch.is_grad_enabled():   # create_graph: y as a function of x and the kernel
            y = _pointwise(x, conv_weight)
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
            if need_conv and (torch.is_grad_enabled() or _engine_will_need(conv_weight)):
                gconv = (rows_g.t() @ x.permute(0, 2, 3, 1).reshape(n * h * wd, c)).view(conv_weight.shape)
        return gx, gconv, gw, gb, None, None


def _pointwise_batch_norm(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, stats: _RunningStats,
                          scale: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """``bn(conv(x))`` for a 1x1 convolution (see :func:`_centred_pointwise`), times ``scale``,
    then ReLU if ``relu``: one :class:`_PointwiseBatchNorm` node on the C kernels in train mode."""
    pointwise = conv.bias is None and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.kernel_size == (1, 1)
    if (pointwise and bn.training and _layout(x) == _CL and _c_kernel(x) and x.dtype == conv.weight.dtype
            and conv.weight.is_contiguous()):
        weight, bias = _scaled_affine(bn, scale)
        out, mean, invstd = _PointwiseBatchNorm.apply(x, conv.weight, weight, bias, bn.eps, relu)
        stats.add([bn], mean, invstd, out.numel() // out.shape[1])
        return out
    if pointwise:
        y, centre = _centred_pointwise(x, conv.weight, bn)
        return _batch_norm(y, bn, stats, scale=scale, centre=centre, relu=relu)
    return _batch_norm(conv(x), bn, stats, scale=scale, relu=relu)


def _sep_conv(d: torch.Tensor, op: nn.Sequential, stats: _RunningStats, scale: torch.Tensor | None = None) -> torch.Tensor:
    """SepConv (op: ReLU, dw, pw, BN, ReLU, dw, pw, BN) from the output ``d`` of its first
    depthwise convolution on the ReLU'd input, times ``scale``."""
    t = _pointwise_batch_norm(d, op[2], op[3], stats, relu=True)
    return _pointwise_batch_norm(_dw(t, op[5]), op[6], op[7], stats, scale=scale)


def _dil_conv(d: torch.Tensor, op: nn.Sequential, stats: _RunningStats, scale: torch.Tensor | None = None) -> torch.Tensor:
    """DilConv (op: ReLU, dw, pw, BN) from the output ``d`` of its depthwise convolution on
    the ReLU'd input, times ``scale``."""
    return _pointwise_batch_norm(d, op[2], op[3], stats, scale=scale)


def _factorized_reduce(halves: tuple[torch.Tensor, torch.Tensor], op: FactorizedReduce, stats: _RunningStats,
                       scale: torch.Tensor | None = None) -> torch.Tensor:
    """FactorizedReduce (same arithmetic as its forward) from the even and odd pixels of its
    ReLU'd input (:class:`_EvenOdd`), times ``scale``. Its stride-2 1x1 convolutions are
    stride-1 convolutions of these; an odd input size gets the reference's zero padding."""
    even, odd = halves
    if odd.shape[-2:] != even.shape[-2:]:
        odd = F.pad(odd, (0, even.shape[-1] - odd.shape[-1], 0, even.shape[-2] - odd.shape[-2]))
    y1, centre1 = _centred_pointwise(even, op.conv_1.weight, op.bn)
    y2, centre2 = _centred_pointwise(odd, op.conv_2.weight, op.bn)
    centre = None if centre1 is None else torch.cat([centre1, centre2])
    return _batch_norm(torch.cat([y1, y2], dim=1), op.bn, stats, scale=scale, centre=centre)


class _RunningStats:
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


def _centre(x: torch.Tensor) -> torch.Tensor:
    """An estimate of ``x``'s per-channel mean, close enough to centre it for the batch-norm
    kernel's sums (see :func:`_batch_norm`): the mean over the first few images, at least
    2048 values per channel (any shift is exact; this one leaves ~2% of the spread)."""
    n, _, h, w = x.shape
    return x[: min(n, -(-2048 // (h * w)))].mean(dim=(0, 2, 3))


def _c_kernel(x: torch.Tensor) -> bool:
    """Whether a training-mode batch norm of ``x`` (or of a 1x1 convolution of it) runs on the
    C kernels of :mod:`nbutils.accel.channels_last_kernels`."""
    return channels_last_kernels.applies(x)


def _batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d, stats: _RunningStats, shared: list[nn.BatchNorm2d] | None = None,
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
    weight, bias = _scaled_affine(bn, scale)
    if not bn.training and bn.track_running_stats:
        out = F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, False, 0.0, bn.eps)
        return out.relu_() if relu else out
    if _c_kernel(x):
        out, mean, invstd = channels_last_kernels.BatchNormFunction.apply(x, weight, bias, bn.eps, relu)
    else:
        if centre is None and _layout(x) == _CL:
            with torch.no_grad():
                centre = _centre(x)
            x = x - centre.view(1, -1, 1, 1)
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, bn.eps)
        if relu:
            out = out.relu_()   # batch norm's backward needs its input only
    if centre is not None:
        mean = mean + centre
    stats.add([bn] + list(shared or ()), mean, invstd, x.numel() // x.shape[1])
    return out


def _scaled_affine(bn: nn.BatchNorm2d, scale: torch.Tensor | None) -> tuple:
    """``bn``'s affine weight and bias times ``scale`` (None where it has none)."""
    weight, bias = bn.weight, bn.bias
    if scale is not None:
        weight = scale if weight is None else weight * scale
        bias = None if bias is None else bias * scale
    return weight, bias


def _pool(x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """``pool(x)``; DARTS' 3x3 average pool (padding 1, the padding left out of the count) as a
    depthwise convolution with a kernel of ones times 1 / count per pixel: on channels_last,
    ``avg_pool2d`` and its backward are much slower than a depthwise 3x3 convolution (see
    ``benchmarks/README.md``)."""
    if (isinstance(pool, nn.AvgPool2d) and not pool.count_include_pad and not pool.ceil_mode
            and pool.divisor_override is None and _pair(pool.kernel_size) == (3, 3) and _pair(pool.padding) == (1, 1)
            and _pair(pool.stride)[0] == _pair(pool.stride)[1]):
        stride = _pair(pool.stride)[0]
        ones = x.new_ones(x.shape[1], 1, 3, 3)
        return depthwise_conv2d(x, ones, stride, 1, 1) * _inverse_counts(x.shape[-2:], stride, x.dtype, x.device)
    return pool(x)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@functools.lru_cache(maxsize=64)
def _inverse_counts(size: tuple[int, int], stride: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 / (number of input pixels inside each 3x3 window, padding 1), per output pixel."""
    ones = torch.ones(1, 1, *size, dtype=dtype, device=device)
    return F.conv2d(ones, torch.ones(1, 1, 3, 3, dtype=dtype, device=device), None, stride, 1).reciprocal_()


def _pool_shareable(bns: list[nn.Module]) -> bool:
    first = bns[0]
    return all(
        isinstance(bn, nn.BatchNorm2d) and bn.training and not bn.affine and bn.eps == first.eps for bn in bns
    )


def _source_forward(cell: SearchCell, h: torch.Tensor, edges: list[tuple[int, int]], scales: list[list[torch.Tensor]],
                    nodes: list[_NodeSum], stats: _RunningStats) -> None:
    """Add the contributions of every edge reading state ``h`` to the node accumulators.
    ``edges``: (node, edge index) pairs; ``scales[e][k]``: edge e's weight for operation k,
    per channel."""
    pools: dict[str, list] = {}
    convs: list = []     # sep and dil convolutions: their first depthwise convolutions share relu_h
    reduces: list = []   # FactorizedReduce skips (reduction cells)
    for node, e in edges:
        mixed = cell.edges[e]
        w = scales[e]
        for k, (name, op) in enumerate(zip(mixed.primitives, mixed.ops)):
            if name == "none":
                continue
            if name in _POOLS:
                pools.setdefault(name, []).append((node, w[k], op))
                continue
            if name == "skip_connect":
                if isinstance(op, FactorizedReduce):
                    reduces.append((node, w[k], op))
                else:
                    nodes[node].add(w[k], op(h))      # identity, with or without dropout
                continue
            if name in _SEP or name in _DIL:
                convs.append((node, w[k], name, op))
            else:  # pragma: no cover - PRIMITIVES is closed; keep the plain semantics anyway
                nodes[node].add(w[k], op(h))
    if convs or reduces:
        relu_h = F.relu(h)
        on_even = [i for i, (*_, op) in enumerate(convs) if _reads_even_pixels(op[1])]
        on_all = [i for i in range(len(convs)) if i not in on_even]
        halves = _EvenOdd.apply(relu_h) if on_even or reduces else None
        firsts = dict(zip(on_all, _depthwise_fanout(relu_h, [convs[i][-1][1] for i in on_all])))
        if on_even:
            firsts.update(zip(on_even, _depthwise_fanout(halves[0], [convs[i][-1][1] for i in on_even], on_even=True)))
        for i, (node, wk, name, op) in enumerate(convs):
            nodes[node].add_owned((_sep_conv if name in _SEP else _dil_conv)(firsts[i], op, stats, scale=wk))
        for node, wk, op in reduces:
            nodes[node].add_owned(_factorized_reduce(halves, op, stats, scale=wk))
    for name, uses in pools.items():
        pooled = _pool(h, uses[0][2][0])
        bns = [op[1] for _, _, op in uses]
        if len(uses) > 1 and _pool_shareable(bns):
            out = _batch_norm(pooled, bns[0], stats, bns[1:])
            for node, wk, _ in uses:
                nodes[node].add(wk, out)
        else:
            for node, wk, op in uses:
                nodes[node].add_owned(_batch_norm(pooled, op[1], stats, scale=wk))


def _preprocess(module: nn.Module, relu_x: torch.Tensor, stats: _RunningStats) -> torch.Tensor:
    """``module(x)`` for a preprocessing module, both of whose kinds start with ``ReLU``, from
    ``relu_x = ReLU(x)``: each cell output is read by two preprocessings (of the next two
    cells), which share its ReLU."""
    if isinstance(module, ReLUConvBN):
        return _pointwise_batch_norm(relu_x, module[1], module[2], stats)
    if isinstance(module, FactorizedReduce):
        return _factorized_reduce(_EvenOdd.apply(relu_x), module, stats)
    raise TypeError(f"unexpected preprocessing module {type(module).__name__}")  # pragma: no cover


def _cell_forward(cell: SearchCell, relu_s0: torch.Tensor, relu_s1: torch.Tensor, weights: torch.Tensor,
                  stats: _RunningStats, dense_grads: bool = True) -> torch.Tensor:
    """One search cell, from the ReLU of its two inputs; ``dense_grads``: see :class:`_DenseGrad`."""
    states = [_preprocess(cell.preprocess0, relu_s0, stats), _preprocess(cell.preprocess1, relu_s1, stats)]
    # the architecture weights expanded per channel, one vector per (edge, operation): one
    # unbind (a single stack in the backward) instead of a select per operation, and each
    # vector is the batch-norm weight its operation's output gets (see _batch_norm)
    n_edges, n_ops = weights.shape
    vectors = weights.unsqueeze(-1).expand(n_edges, n_ops, states[0].shape[1]).contiguous().view(n_edges * n_ops, -1)
    vectors = vectors.unbind(0)
    scales = [vectors[e * n_ops: (e + 1) * n_ops] for e in range(n_edges)]
    offsets = [node * (node + 3) // 2 for node in range(STEPS)]   # first edge of each node
    nodes = [_NodeSum() for _ in range(STEPS)]
    for j in range(STEPS + 1):          # source state j feeds nodes max(0, j - 1) .. STEPS - 1
        if j >= 2:
            states.append(nodes[j - 2].state(dense_grads))   # node j - 2 has all its inputs now
        edges = [(node, offsets[node] + j) for node in range(max(0, j - 1), STEPS)]
        _source_forward(cell, states[j], edges, scales, nodes, stats)
    states.append(nodes[STEPS - 1].state(dense_grads))
    return torch.cat(states[-STEPS:], dim=1)


class FastSuperNet(SuperNet):
    """``SuperNet`` with a faster forward (same modules, parameters, buffers and function)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_normal = F.softmax(self.alpha_normal, dim=-1)
        w_reduce = F.softmax(self.alpha_reduce, dim=-1)
        conv, bn = self.stem
        x = x.contiguous(memory_format=_CL)
        stats = _RunningStats()
        # With one input channel (grey images) the input's channels_last and NCHW layouts are
        # the same strides, PyTorch takes it for NCHW and the stem's convolution returns NCHW:
        # made channels_last here, every later tensor is too (else the whole network would run
        # in NCHW, on none of the channels_last kernels)
        out = _batch_norm(conv(x).contiguous(memory_format=_CL), bn, stats)
        relu_s0 = relu_s1 = F.relu(out)
        last = len(self.cells) - 1
        for i, cell in enumerate(self.cells):
            # The last cell's gradient comes from the global average pool: constant over each
            # image's channel. PyTorch's channels_last batch-norm backward kernel, which sums in
            # float32 pixel after pixel, loses accuracy on it (more than the float32 tests allow
            # against plain), while its generic kernel, which runs on the strided gradient and
            # sums in double, does not; the last cell is the smallest, so this costs little. The C
            # kernels sum accurately: with them the last cell's gradients are made dense too.
            out = _cell_forward(cell, relu_s0, relu_s1, w_reduce if cell.reduction else w_normal, stats,
                                dense_grads=i < last or _c_kernel(out))
            relu_s0, relu_s1 = relu_s1, (F.relu(out) if i < last else None)
        stats.apply()
        return self.classifier(self.global_pooling(out).flatten(1))
