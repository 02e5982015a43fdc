"""C kernels for the fast supernet's channels_last CPU tensors: training-mode batch norm
(optionally followed by a ReLU), the backward of a per-channel scaled add, and depthwise
convolution with its two gradients.

PyTorch's CPU batch norm on channels_last tensors is slow for the narrow tensors of a DARTS
supernet (16-64 channels) and inaccurate in float32: it accumulates its sums in float32, with
~1e-5 relative error at 64 x 32 x 32 values per channel (~1e-4 when the mean is large against
the spread). The kernels in ``channels_last_kernels.c`` view the tensor as an (M, C) matrix, sum
over blocks of 16 rows in the tensor's type and over blocks in double, shifted by the first
row, so the statistics are accurate to ~1e-7 relative without centring the input first; the
backward computes the weight and bias gradients and the input gradient in two passes over
``grad`` and ``x``; and a ReLU after the norm is fused into both (its backward recomputes the
mask from ``x``, so nothing more is saved). Both are faster than ``torch.native_batch_norm``
and its backward at the supernet's shapes; the timings are in ``benchmarks/README.md``.

The backward of ``total + value * scale`` (``scale`` per channel, the architecture weight of
an identity or a shared pool) makes ``grad * scale`` and the per-channel sums of
``grad * value`` in one pass; autograd's own makes two full-size products and a reduction.

The running statistics of all a forward's batch norms are updated in one call
(:func:`running_stats_update`), from tables of pointers: PyTorch's per-tensor operations
would cost a few microseconds each, thousands per forward.

Depthwise convolution (``channels_last_kernels_depthwise.h``; any stride, padding,
dilation, square kernel): at the supernet's sizes (8-64 channels, 4x4 to 32x32 pixels) oneDNN's depthwise
convolution is dominated by its fixed cost per call, and its backward is slow for dilated and
5x5 kernels. The C loops run over a row's pixels and channels as one contiguous span per
kernel tap (the tap's weights repeated along the row), which the compiler vectorises; the
weight gradient sums each image in the tensor's type and the images in double.

The C source is compiled on first use with the system's C compiler (``cc``, ``-O3
-march=native -mprefer-vector-width=512 -fopenmp``: 512-bit vectors where the CPU has them, a
little faster for the convolutions' spans, the same arithmetic per channel) into a per-user
cache keyed by the source, the flags and the CPU; it calls no PyTorch API (``ctypes`` passes raw pointers), so it builds quickly and
shares PyTorch's OpenMP runtime (the same ``libgomp.so.1`` soname), whose thread count
``torch.set_num_threads`` sets. Without a compiler, or with ``NBUTILS_NO_C_KERNELS=1``,
:func:`available` is false and callers use PyTorch's kernels.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["available", "applies", "batch_norm", "BatchNormFunction", "bn_forward", "bn_backward",
           "scaled_add_backward", "running_stats_update", "depthwise_applies",
           "depthwise_forward", "depthwise_input_grad", "depthwise_weight_grad", "block_pointers",
           "bn_forward_blocks", "bn_backward_blocks", "depthwise_blocks"]

_SOURCES = [Path(__file__).with_name(name) for name in
            ("channels_last_kernels.c", "channels_last_kernels.h", "channels_last_kernels_depthwise.h",
             "channels_last_kernels_blocks.h")]
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]
if platform.machine().lower() in ("x86_64", "amd64"):   # an x86 option: other compilers' targets refuse it
    _FLAGS.insert(2, "-mprefer-vector-width=512")
_DTYPES = {torch.float32: "_f32", torch.float64: "_f64"}


def _cache_dir() -> Path:
    root = os.environ.get("NBUTILS_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nbutils", "kernels")
    return Path(root)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    """The compiled library, from the cache or compiled now (atomically: concurrent processes
    each write a temporary file and rename it)."""
    key = hashlib.sha256()
    for source in _SOURCES:
        key.update(source.read_bytes())
    key.update(" ".join([compiler, *_FLAGS, platform.machine(), _cpu_flags()]).encode())
    target = _cache_dir() / f"channels_last_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(_SOURCES[0]), "-o", tmp, "-lm"], check=True, capture_output=True,
                       text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("NBUTILS_NO_C_KERNELS"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: batch norm runs on PyTorch's kernels")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        log.warning("could not build the C batch-norm kernels (%s): PyTorch's kernels are used", detail.strip()[:500])
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for suffix in _DTYPES.values():
        forward = getattr(lib, "bn_forward" + suffix)
        forward.argtypes = [p, i64, i64, p, p, ctypes.c_double, ctypes.c_int, p, p, p]
        forward.restype = None
        backward = getattr(lib, "bn_backward" + suffix)
        backward.argtypes = [p, p, i64, i64, p, p, p, p, ctypes.c_int, p, p, p]
        backward.restype = None
        scaled = getattr(lib, "scaled_add_backward" + suffix)
        scaled.argtypes = [p, p, i64, i64, p, p, p]
        scaled.restype = None
        update = getattr(lib, "running_stats_update" + suffix)
        update.argtypes = [i64, p, p, p, p, p, p, p, p, p]
        update.restype = None
        for name, args in (("bn_forward_blocks", [i64, p, i64, i64, p, ctypes.c_double, p, p, p, p]),
                           ("bn_backward_blocks", [i64, p, p, i64, i64, p, p, p, p, p, p]),
                           ("dw_forward_blocks", [i64, i64, i64, p, p, p, i64, i64, p]),
                           ("dw_input_grad_blocks", [i64, i64, i64, p, p, p, i64, i64, p, p]),
                           ("dw_weight_grad_blocks", [i64, i64, i64, p, p, p, i64, i64, p]),
                           ("dw_forward", [p, i64, i64, i64, i64, p, i64, i64, i64, i64, p, i64, i64]),
                           ("dw_input_grad", [p, i64, i64, i64, i64, p, i64, i64, i64, i64, i64, i64, ctypes.c_int, p]),
                           ("dw_weight_grad", [p, i64, i64, i64, i64, p, i64, i64, i64, i64, i64, i64, p])):
            function = getattr(lib, name + suffix)
            function.argtypes = args
            function.restype = None
    return lib


def available() -> bool:
    """Whether the C kernels are built and loaded (building them on first call)."""
    return _library() is not None


def applies(x: torch.Tensor) -> bool:
    """Whether the C kernels take ``x``: a CPU float32/float64 tensor, 4-D, dense in
    channels_last, with more than one value per channel."""
    return (x.is_cpu and x.dtype in _DTYPES and x.dim() == 4 and x.shape[1] > 0
            and x.numel() > x.shape[1] and x.is_contiguous(memory_format=torch.channels_last)
            and available())


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _operand(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A per-channel vector as the kernels read it: dense, of ``like``'s dtype, no autograd."""
    if t is None or (t.dtype == like.dtype and t.is_contiguous()):   # data_ptr() reads it as it is
        return t
    return t.detach().to(like.dtype).contiguous()


class BatchNormFunction(torch.autograd.Function):
    """``native_batch_norm(x, weight, bias, training=True)``, then ``relu`` if asked, through
    the C kernels; returns ``(out, mean, invstd)`` (the last two not differentiable). The
    backward runs the C kernel, or, when a graph of the backward is asked for (double
    backward), PyTorch's differentiable batch-norm backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, relu: bool):
        out, mean, invstd = bn_forward(x, weight, bias, eps, relu)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps, ctx.relu = eps, relu
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)
        return out, mean, invstd

    @staticmethod
    def backward(ctx, grad, _mean, _invstd):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():   # create_graph: differentiable operations
            return (*differentiable_backward(grad, x, weight, bias, mean, invstd, ctx.eps, ctx.relu, need), None,
                    None)
        return (*bn_backward(grad, x, weight, bias, mean, invstd, ctx.relu, need), None, None)


def bn_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of :class:`BatchNormFunction` without autograd: ``(out, mean, invstd)``."""
    c = x.shape[1]
    w, b = _operand(weight, x), _operand(bias, x)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    mean, invstd = x.new_empty(c), x.new_empty(c)
    getattr(_library(), "bn_forward" + _DTYPES[x.dtype])(
        _pointer(x), x.numel() // c, c, _pointer(w), _pointer(b), eps, int(relu), _pointer(out), _pointer(mean),
        _pointer(invstd))
    return out, mean, invstd


def bn_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                mean: torch.Tensor, invstd: torch.Tensor, relu: bool, need) -> tuple:
    """The backward of :func:`bn_forward` without autograd: the gradients of ``x``, ``weight``
    and ``bias``, each only where ``need`` (three booleans) asks for it."""
    need_x, need_w, need_b = need
    c = x.shape[1]
    grad = grad.contiguous(memory_format=torch.channels_last)
    w, b = _operand(weight, x), _operand(bias, x)
    gx = torch.empty_like(x, memory_format=torch.channels_last) if need_x else None
    gw = x.new_empty(c) if need_w else None
    gb = x.new_empty(c) if need_b else None
    if need_x or need_w or need_b:
        getattr(_library(), "bn_backward" + _DTYPES[x.dtype])(
            _pointer(grad), _pointer(x), x.numel() // c, c, _pointer(w), _pointer(b), _pointer(mean),
            _pointer(invstd), int(relu), _pointer(gx), _pointer(gw), _pointer(gb))
    return gx, _like(gw, weight), _like(gb, bias)


def _like(g: torch.Tensor | None, param: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None or param is None else g.to(param.dtype)


def differentiable_backward(grad, x, weight, bias, mean, invstd, eps, relu, mask):
    """:func:`bn_backward` with PyTorch's differentiable operations (for double backward)."""
    if relu:
        out = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)[0]
        grad = grad * (out > 0)
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
        grad, x, weight, None, None, mean, invstd, True, eps, list(mask))
    return gx, gw, gb


def batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               relu: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch norm of ``x`` with batch statistics, then ReLU if ``relu``:
    ``(out, mean, invstd)`` as ``torch.native_batch_norm`` returns them. Through the C kernels
    when :func:`applies`, else PyTorch's."""
    if applies(x):
        return BatchNormFunction.apply(x, weight, bias, eps, relu)
    out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    return (out.relu_() if relu else out), mean, invstd


def scaled_add_backward(grad: torch.Tensor, value: torch.Tensor, scale: torch.Tensor, need_value: bool = True,
                        need_scale: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``total + value * scale.view(1, -1, 1, 1)`` w.r.t. ``value`` and ``scale``
    given the output's ``grad``: ``(grad * scale, (grad * value).sum((0, 2, 3)))``, each only
    if asked for. ``value`` must satisfy :func:`applies`; ``grad`` is made channels_last."""
    c = value.shape[1]
    grad = grad.contiguous(memory_format=torch.channels_last)
    s = _operand(scale, value)
    grad_value = torch.empty_like(value, memory_format=torch.channels_last) if need_value else None
    grad_scale = value.new_empty(c) if need_scale else None
    if need_value or need_scale:
        getattr(_library(), "scaled_add_backward" + _DTYPES[value.dtype])(
            _pointer(grad), _pointer(value), value.numel() // c, c, _pointer(s), _pointer(grad_value),
            _pointer(grad_scale))
    return grad_value, _like(grad_scale, scale)


# --------------------------------------------------------------------------- depthwise convolution


def depthwise_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the C depthwise convolution takes input ``x`` and weight ``w`` (C x 1 x K x K):
    ``x`` as :func:`applies` wants it, ``w`` dense, of its dtype, without autograd history
    being needed inside the kernel (callers pass detached tensors through their own Function)."""
    return (applies(x) and w.dtype == x.dtype and w.device == x.device and w.dim() == 4 and w.shape[1] == 1
            and w.shape[0] == x.shape[1] and w.shape[2] == w.shape[3])


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def depthwise_forward(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """``F.conv2d(x, w, None, stride, padding, dilation, groups=C)`` (no autograd) for ``x``, ``w``
    that :func:`depthwise_applies` takes; the output is channels_last."""
    n, c, h, wd = x.shape
    k = w.shape[-1]
    oh, ow = _out_size(h, k, stride, padding, dilation), _out_size(wd, k, stride, padding, dilation)
    out = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    w = w.detach().contiguous()
    getattr(_library(), "dw_forward" + _DTYPES[x.dtype])(
        _pointer(x), n, h, wd, c, _pointer(w), k, stride, padding, dilation, _pointer(out), oh, ow)
    return out


def depthwise_input_grad(grad: torch.Tensor, w: torch.Tensor, x_shape, stride: int, padding: int, dilation: int,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d input of :func:`depthwise_forward` given ``grad`` (made channels_last), a
    channels_last tensor of shape ``x_shape``; added into ``out`` (channels_last) if given."""
    n, c, h, wd = x_shape
    k = w.shape[-1]
    grad = grad.contiguous(memory_format=torch.channels_last)
    accumulate = out is not None
    if out is None:
        out = torch.empty(tuple(x_shape), dtype=grad.dtype, device=grad.device, memory_format=torch.channels_last)
    w = w.detach().contiguous()
    getattr(_library(), "dw_input_grad" + _DTYPES[grad.dtype])(
        _pointer(grad), n, h, wd, c, _pointer(w), k, stride, padding, dilation, grad.shape[2], grad.shape[3],
        int(accumulate), _pointer(out))
    return out


def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, k: int, stride: int, padding: int,
                          dilation: int) -> torch.Tensor:
    """d loss / d weight (C x 1 x k x k) of :func:`depthwise_forward` of ``x`` given ``grad``."""
    n, c, h, wd = x.shape
    grad = grad.contiguous(memory_format=torch.channels_last)
    gw = x.new_empty((c, 1, k, k))
    getattr(_library(), "dw_weight_grad" + _DTYPES[x.dtype])(
        _pointer(x), n, h, wd, c, _pointer(grad), k, stride, padding, dilation, grad.shape[2], grad.shape[3],
        _pointer(gw))
    return gw


# --------------------------------------------------------------------------- running statistics


def _dense_cpu(t: torch.Tensor, dtype: torch.dtype, numel: int) -> bool:
    return t.dtype == dtype and t.is_cpu and t.numel() == numel and t.is_contiguous()


def running_stats_update(modules: list, means: list[torch.Tensor], invstds: list[torch.Tensor],
                         momenta: list[float], unbias: list[float]) -> bool:
    """``bn.running_mean = (1 - m) * bn.running_mean + m * mean`` and the same for the running
    variance (made unbiased by the factor in ``unbias``, from ``invstd`` as :func:`bn_forward`
    returns it), ``num_batches_tracked += 1``, for every BN module of ``modules`` in one C
    call (thousands of small PyTorch operations otherwise). Returns False, changing nothing,
    unless every buffer and statistic is a dense CPU tensor of one dtype the kernels take."""
    if not modules or not available():
        return False
    dtype = means[0].dtype
    if dtype not in _DTYPES:
        return False
    rows = []
    for bn, mean, invstd in zip(modules, means, invstds):
        running_mean, running_var, tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
        c = mean.numel()
        if not (_dense_cpu(running_mean, dtype, c) and _dense_cpu(running_var, dtype, c) and _dense_cpu(mean, dtype, c)
                and _dense_cpu(invstd, dtype, c) and (tracked is None or _dense_cpu(tracked, torch.int64, 1))):
            return False
        rows.append((running_mean.data_ptr(), running_var.data_ptr(), 0 if tracked is None else tracked.data_ptr(),
                     mean.data_ptr(), invstd.data_ptr(), c))
    n = len(modules)
    pointers = torch.tensor(rows, dtype=torch.int64).t().contiguous()
    scalars = torch.tensor([momenta, [bn.eps for bn in modules], unbias], dtype=torch.float64)
    base, row = pointers.data_ptr(), pointers.stride(0) * 8
    fbase, frow = scalars.data_ptr(), scalars.stride(0) * 8
    getattr(_library(), "running_stats_update" + _DTYPES[dtype])(
        n, base + 5 * row, base, base + row, base + 2 * row, base + 3 * row, base + 4 * row, fbase, fbase + frow,
        fbase + 2 * frow)
    return True


# --------------------------------------------------------------------------- several tensors per call


def block_pointers(t: torch.Tensor) -> list[int]:
    """The addresses of ``t[0], t[1], ...`` for a contiguous ``t``: its blocks, for the
    ``*_blocks`` kernels."""
    step = t.stride(0) * t.element_size()
    return [t.data_ptr() + k * step for k in range(t.shape[0])]


def _int64s(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _int32s(values) -> torch.Tensor:
    return torch.tensor([int(v) for v in values], dtype=torch.int32)


def bn_forward_blocks(dtype: torch.dtype, x: list[int], m: int, c: int, weights: list[int], eps: float,
                      relu: list[bool], out: list[int], mean: torch.Tensor, invstd: torch.Tensor) -> None:
    """:func:`bn_forward` of each block ``(M, C)`` at the addresses ``x``, into ``out``; ``weights``:
    each block's affine weight (0: none), ``relu`` each block's ReLU; ``mean`` and ``invstd``
    (blocks, C) receive the statistics. One C call."""
    pointers = _int64s([x, weights, out])
    flags = _int32s(relu)
    row = pointers.stride(0) * 8
    getattr(_library(), "bn_forward_blocks" + _DTYPES[dtype])(
        len(x), pointers.data_ptr(), m, c, pointers.data_ptr() + row, eps, flags.data_ptr(),
        pointers.data_ptr() + 2 * row, _pointer(mean), _pointer(invstd))


def bn_backward_blocks(dtype: torch.dtype, grad: list[int], x: list[int], m: int, c: int, weights: list[int],
                       mean: torch.Tensor, invstd: torch.Tensor, relu: list[bool], grad_input: list[int],
                       grad_weight: list[int]) -> None:
    """:func:`bn_backward` of each block (no bias), one C call; ``grad_input`` and
    ``grad_weight``: each block's outputs, 0 where not needed. ``mean`` and ``invstd`` are
    (blocks, C), as :func:`bn_forward_blocks` wrote them."""
    pointers = _int64s([grad, x, weights, grad_input, grad_weight])
    flags = _int32s(relu)
    base, row = pointers.data_ptr(), pointers.stride(0) * 8
    getattr(_library(), "bn_backward_blocks" + _DTYPES[dtype])(
        len(x), base, base + row, m, c, base + 2 * row, _pointer(mean), _pointer(invstd), flags.data_ptr(),
        base + 3 * row, base + 4 * row)


def depthwise_blocks(kind: str, dtype: torch.dtype, n: int, c: int, confs: list[tuple], first: list[int],
                     second: list[int], out_size: tuple[int, int], results: list[int],
                     accumulate: list[bool] | None = None) -> None:
    """The depthwise convolution of several blocks in one C call. ``confs``: per block the
    input's height and width, the kernel size, stride, padding and dilation; every output is
    ``(n, *out_size, c)``, channels last. ``kind``:

    * ``"forward"``: ``first`` the inputs, ``second`` the weights (C, 1, K, K), ``results`` the outputs;
    * ``"input_grad"``: ``first`` the output gradients, ``second`` the weights, ``results`` the input
      gradients, added into where ``accumulate``;
    * ``"weight_grad"``: ``first`` the inputs, ``second`` the output gradients, ``results`` the weight
      gradients.
    """
    conf = _int64s(confs)
    pointers = _int64s([first, second, results])
    base, row = pointers.data_ptr(), pointers.stride(0) * 8
    oh, ow = out_size
    function = getattr(_library(), f"dw_{kind}_blocks" + _DTYPES[dtype])
    if kind == "input_grad":
        flags = _int32s(accumulate)
        function(len(first), n, c, conf.data_ptr(), base, base + row, oh, ow, flags.data_ptr(), base + 2 * row)
    else:
        function(len(first), n, c, conf.data_ptr(), base, base + row, oh, ow, base + 2 * row)
