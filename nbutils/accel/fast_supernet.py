"""A faster DARTS supernet on CPU: the same function, the same parameters as ``SuperNet``.

``FastSuperNet`` subclasses :class:`nbutils.space.supernet.SuperNet` and keeps every module,
parameter and buffer of it (``state_dict`` is interchangeable both ways); only the forward
computation is rewritten. It reads the weights from the same submodules at every call, so
``torch.func.functional_call`` and optimisers see exactly the plain parameters.

What makes it faster (``benchmarks/supernet_speed.py`` measures it; the figures, and the
alternatives tried and dropped, are in ``benchmarks/README.md``), piece by piece in the modules
it is built from, which :mod:`nbutils.accel.fast_network` shares:

* **channels_last** activations throughout (:mod:`nbutils.accel.channels_last`): oneDNN's
  depthwise convolutions, pools and batch norm are much faster in NHWC than in NCHW; the
  gradients are handed on densely laid out (:class:`~nbutils.accel.channels_last.DenseGrad`
  per node: a node's gradient arrives partly as a channel slice of the cell output's gradient)
  and the even and odd pixels that FactorizedReduce and the stride-2 dilated convolutions read
  are taken once per state (:class:`~nbutils.accel.channels_last.EvenOdd`).
* **depthwise convolutions** (:mod:`nbutils.accel.depthwise`) on the C kernels, or on oneDNN
  with a hand-written backward; the ones that read one ReLU'd state through one autograd node.
* **batch norm** (:mod:`nbutils.accel.batch_norm`) on the C kernels, accurate on channels_last,
  with its 1x1 convolution as one node, a ReLU fused after it, and the running statistics of a
  forward updated at once.
* **the operations** (:mod:`nbutils.accel.operations`) from what the operations reading one
  state share; average pools as depthwise convolutions.
* **the convolutions of the mixed operations that read one state as one autograd node**
  (:mod:`nbutils.accel.mixed_convs`): up to 16 separable and dilated convolutions, each a chain
  of small calls whose fixed cost dominated at a CPU search's sizes, run side by side as stacked
  tensors (one C call per stage for their depthwise convolutions and batch norms, one batched
  product for their 1x1 convolutions). Where it does not apply (affine or eval-mode batch norms,
  no C kernels) each runs on its own, from the pieces above.

And in this module, the mixed operations:

* **work shared between the edges that read the same state**: the ``none`` operation is
  skipped (it contributes exactly zero and its column of d loss / d weights is zero, so the
  alpha gradients are unchanged: the softmax still runs over every column); ``ReLU(x)`` is
  computed once per state for every convolution and FactorizedReduce on its edges; a pool
  and its (affine-free) training-mode BN depend only on the state, so they are computed
  once per state and kind, and every edge's BN module gets the running-stat update it would
  get from its own forward.
* **architecture weights folded into the batch norms**: an operation that ends in batch
  norm (all but the identity skip) is multiplied by its weight through the kernel's affine
  weight (``scale`` of :func:`~nbutils.accel.batch_norm.batch_norm`), so ``w * BN(y)`` costs no
  pass of its own, and the backward kernel returns the alpha gradient as its weight gradient.
  Each cell expands its weights per channel with one ``unbind`` (one stack in the backward,
  instead of a select and a zero-filled scatter per operation). The node sums add these in
  place; the identity skips and the shared pools go through :class:`_AddScaled`, whose backward
  makes one product per input (autograd's ``addcmul_`` makes three).
* **one ReLU per cell output**: the next two cells' preprocessings both start with it.
* the autograd Functions use the ``forward(ctx, ...)`` form, because with ``setup_context``
  every ``apply`` binds its arguments through ``inspect.signature``, a cost paid at each of
  the hundreds of calls per forward. So they do not support ``torch.func`` transforms
  (``vmap``, ``grad``); ``functional_call`` and double backward work.

Every piece computes the same function as the plain network (float64 agrees to ~1e-12; the
float32 accuracy is :mod:`nbutils.accel.batch_norm`'s): there is no switch to turn one off.
``benchmarks/supernet_speed.py --without PIECE`` measures the network without a piece by
patching these modules in its own processes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import channels_last_kernels
from ..space.genotype import STEPS
from ..space.ops import FactorizedReduce
from ..space.supernet import SearchCell, SuperNet
from .batch_norm import RunningStats, batch_norm
from .channels_last import CHANNELS_LAST, DenseGrad, EvenOdd, engine_will_need, on_c_kernels
from .depthwise import depthwise_fanout, reads_even_pixels
from .mixed_convs import DIL as _DIL, SEP as _SEP, mixed_convs
from .operations import dil_conv, factorized_reduce, pool, preprocess, sep_conv

__all__ = ["FastSuperNet"]

_POOLS = ("max_pool_3x3", "avg_pool_3x3")


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
        return DenseGrad.apply(self.total) if dense_grad and self.total.requires_grad else self.total


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
        need_value = need_value and engine_will_need(value)   # see PointwiseBatchNorm
        if on_c_kernels(value) and not torch.is_grad_enabled():
            grad_value, grad_scale = channels_last_kernels.scaled_add_backward(grad, value, scale, need_value,
                                                                                need_scale)
        else:
            grad_value = grad * scale.view(1, -1, 1, 1) if need_value else None
            grad_scale = (grad * value).sum(dim=(0, 2, 3)) if need_scale else None
        return (grad if ctx.has_total else None), grad_value, grad_scale


def _pool_shareable(bns: list[nn.Module]) -> bool:
    """Whether one training-mode batch norm of a pooled state serves all of ``bns``: affine-free,
    the same eps (their running statistics get the same update)."""
    first = bns[0]
    return all(
        isinstance(bn, nn.BatchNorm2d) and bn.training and not bn.affine and bn.eps == first.eps for bn in bns
    )


def _source_forward(cell: SearchCell, h: torch.Tensor, edges: list[tuple[int, int]], scales: list[list[torch.Tensor]],
                    nodes: list[_NodeSum], stats: RunningStats) -> None:
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
        halves = EvenOdd.apply(relu_h) if reduces or any(reads_even_pixels(op[1]) for *_, op in convs) else None
        if convs:
            _convs_forward(relu_h, halves, convs, nodes, stats)
        for node, wk, op in reduces:
            nodes[node].add_owned(factorized_reduce(halves, op, stats, scale=wk))
    for name, uses in pools.items():
        pooled = pool(h, uses[0][2][0])
        bns = [op[1] for _, _, op in uses]
        if len(uses) > 1 and _pool_shareable(bns):
            out = batch_norm(pooled, bns[0], stats, bns[1:])
            for node, wk, _ in uses:
                nodes[node].add(wk, out)
        else:
            for node, wk, op in uses:
                nodes[node].add_owned(batch_norm(pooled, op[1], stats, scale=wk))


def _convs_forward(relu_h: torch.Tensor, halves: tuple | None, convs: list[tuple], nodes: list[_NodeSum],
                   stats: RunningStats) -> None:
    """Add the separable and dilated convolutions ``convs`` (``(node, scale, name, op)``) of one
    state's ReLU ``relu_h`` to the node sums: all in one node of :mod:`nbutils.accel.mixed_convs`
    where it applies, else each on its own from their shared first depthwise convolutions.
    ``halves``: the even and odd pixels of ``relu_h`` (:class:`EvenOdd`; None where nothing reads
    them), of which the stride-2 dilated convolutions read the even ones."""
    on_even = [i for i, (*_, op) in enumerate(convs) if reads_even_pixels(op[1])]
    fused = mixed_convs((relu_h, halves[0] if on_even else None), convs, stats)
    if fused is not None:
        for node, out in fused:
            nodes[node].add_owned(out)
        return
    on_all = [i for i in range(len(convs)) if i not in on_even]
    firsts = dict(zip(on_all, depthwise_fanout(relu_h, [convs[i][-1][1] for i in on_all])))
    if on_even:
        firsts.update(zip(on_even, depthwise_fanout(halves[0], [convs[i][-1][1] for i in on_even], on_even=True)))
    for i, (node, wk, name, op) in enumerate(convs):
        nodes[node].add_owned((sep_conv if name in _SEP else dil_conv)(firsts[i], op, stats, scale=wk))


def _cell_forward(cell: SearchCell, relu_s0: torch.Tensor, relu_s1: torch.Tensor, weights: torch.Tensor,
                  stats: RunningStats, dense_grads: bool = True) -> torch.Tensor:
    """One search cell, from the ReLU of its two inputs; ``dense_grads``: see :class:`DenseGrad`."""
    states = [preprocess(cell.preprocess0, relu_s0, stats), preprocess(cell.preprocess1, relu_s1, stats)]
    # the architecture weights expanded per channel, one vector per (edge, operation): one
    # unbind (a single stack in the backward) instead of a select per operation, and each
    # vector is the batch-norm weight its operation's output gets (see batch_norm)
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
        x = x.contiguous(memory_format=CHANNELS_LAST)
        stats = RunningStats()
        # With one input channel (grey images) the input's channels_last and NCHW layouts are
        # the same strides, PyTorch takes it for NCHW and the stem's convolution returns NCHW:
        # made channels_last here, every later tensor is too (else the whole network would run
        # in NCHW, on none of the channels_last kernels)
        out = batch_norm(conv(x).contiguous(memory_format=CHANNELS_LAST), bn, stats)
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
                                dense_grads=i < last or on_c_kernels(out))
            relu_s0, relu_s1 = relu_s1, (F.relu(out) if i < last else None)
        stats.apply()
        return self.classifier(self.global_pooling(out).flatten(1))
