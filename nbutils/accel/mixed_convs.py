"""The separable and dilated convolutions of the mixed operations that read one state, as one
autograd node of stacked tensors.

A DARTS state is read by up to four edges, and each edge holds two separable and two dilated
convolutions: up to 16 convolutions of one tensor, each a chain of small operations (a depthwise
convolution, a 1x1 convolution, a batch norm, and for the separable ones the same again). At a
CPU search's sizes (8 channels, 16x16 pixels, batch 32) every one of these calls costs mostly its
fixed per-call cost: the autograd node, the Python wrapper, the kernel launch. Here they run as
**one node**, the convolutions of one kind of stage side by side:

* the first depthwise convolution of every operation in one C call
  (:func:`channels_last_kernels.depthwise_blocks`), their outputs the blocks of one
  ``(blocks, N*H*W, C)`` tensor;
* the 1x1 convolutions of the stage as one batched matrix product (``torch.bmm``);
* their batch norms in one C call (:func:`channels_last_kernels.bn_forward_blocks`), each
  block its own statistics: the separable convolutions' first ones with their ReLU fused, the
  dilated convolutions' with the architecture weight folded into the affine weight (as in
  :func:`nbutils.accel.batch_norm.batch_norm`);
* then the separable convolutions' second halves the same way;
* and the outputs of each edge summed into one tensor per node the state feeds.

The backward runs the same calls in reverse, skipping what the running backward pass does not
use (the weights' gradients in the architecture step, the input's where the pass ends above
it). The arithmetic is that of :mod:`nbutils.accel.operations` (the same kernels, the same
products); only the order of the per-node sums differs. Double backward (``create_graph``)
recomputes the node's outputs with PyTorch's differentiable operations and differentiates them.

:func:`mixed_convs` says when it applies (training-mode batch norms without affine parameters,
the C kernels); otherwise the fast supernet runs each operation on its own. The speed-up is
measured by ``benchmarks/supernet_speed.py``; the figures are in ``benchmarks/README.md``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import channels_last_kernels as kernels
from .batch_norm import RunningStats
from .channels_last import CHANNELS_LAST, engine_will_need, on_c_kernels
from .depthwise import reads_even_pixels

__all__ = ["SEP", "DIL", "mixed_convs"]

SEP = ("sep_conv_3x3", "sep_conv_5x5")
DIL = ("dil_conv_3x3", "dil_conv_5x5")


@dataclass(frozen=True)
class _Plan:
    """The static description of one fused node: ``S`` separable convolutions, then ``D``
    dilated ones (the stage-1 blocks, in this order), and the nodes they feed."""
    n_inputs: int
    block_input: tuple[int, ...]        # stage-1 block -> index of the input it reads
    conf1: tuple[tuple[int, ...], ...]  # stage-1 block -> (h, w, k, stride, padding, dilation)
    conf2: tuple[tuple[int, ...], ...]  # separable convolution -> the same for its second half
    eps1: float
    eps2: float
    block_slot: tuple[int, ...]         # stage-1 block -> output slot (separable: of its second half)
    n_slots: int
    n: int
    c: int
    out_size: tuple[int, int]
    bns: tuple[tuple[nn.BatchNorm2d, ...], tuple[nn.BatchNorm2d, ...]]   # stage 1, stage 2: their running stats

    @property
    def seps(self) -> int:
        return len(self.conf2)

    @property
    def blocks(self) -> int:
        return len(self.conf1)

    def unpack(self, tensors):
        """``(inputs, dw1, pw1, dw2, pw2, scales)`` from the Function's flat tensor arguments;
        ``scales``: the separable convolutions' then the dilated ones'."""
        k, s = self.blocks, self.seps
        bounds = [self.n_inputs, k, k, s, s, k]
        parts, start = [], 0
        for size in bounds:
            parts.append(tensors[start: start + size])
            start += size
        return parts


def mixed_convs(inputs: tuple[torch.Tensor, torch.Tensor | None], convs: list[tuple], stats: RunningStats
                ) -> list[tuple[int, torch.Tensor]] | None:
    """The summed outputs, per node, of the separable and dilated convolutions ``convs`` reading
    one state, each times its weight: ``[(node, tensor)]``; or None where the fused node does
    not apply (the caller then runs each operation on its own).

    ``inputs``: the ReLU of the state, and its even pixels (:class:`~nbutils.accel.channels_last.EvenOdd`)
    or None; ``convs``: ``(node, scale, name, op)`` with ``scale`` the per-channel weight of
    the operation ``op`` (a ``SepConv`` or ``DilConv`` module: ReLU, depthwise, 1x1, BN[, ReLU,
    depthwise, 1x1, BN]). Convolutions that read only the even pixels (stride 2, dilation 2)
    read ``inputs[1]`` as stride-1 undilated convolutions, as
    :func:`nbutils.accel.depthwise.depthwise_fanout` does."""
    built = _build(inputs, convs)
    if built is None:
        return None
    plan, tensors, nodes = built
    outs = _MixedConvs.apply(plan, stats, *tensors)
    return list(zip(nodes, outs))


def _build(inputs, convs):
    """The plan and the flat tensor arguments of :class:`_MixedConvs`, and the nodes of its
    outputs; or None where it does not apply."""
    relu_h, even = inputs
    if not on_c_kernels(relu_h) or (even is not None and not on_c_kernels(even)):
        return None
    seps = [(node, scale, op) for node, scale, name, op in convs if name in SEP]
    dils = [(node, scale, op) for node, scale, name, op in convs if name in DIL]
    if len(seps) + len(dils) != len(convs):
        return None
    ops = [op for _, _, op in seps + dils]
    scales = [scale for _, scale, _ in seps + dils]
    n, c = relu_h.shape[:2]
    firsts = _first_halves(inputs, ops, c, relu_h.dtype)
    if firsts is None:
        return None
    block_input, conf1, out_size = firsts
    conf2 = _second_halves([op for _, _, op in seps], out_size, c, relu_h.dtype)
    bns1, bns2 = tuple(op[3] for op in ops), tuple(op[7] for _, _, op in seps)
    if (conf2 is None or len({bn.eps for bn in bns1}) != 1 or len({bn.eps for bn in bns2}) > 1
            or any(t.dtype != relu_h.dtype or not t.is_contiguous() or t.shape != (c,) for t in scales)):
        return None
    nodes = list(dict.fromkeys(node for node, _, _ in seps + dils))
    plan = _Plan(n_inputs=1 if even is None else 2, block_input=block_input, conf1=conf1, conf2=conf2,
                 eps1=bns1[0].eps, eps2=bns2[0].eps if bns2 else 0.0,
                 block_slot=tuple(nodes.index(node) for node, _, _ in seps + dils), n_slots=len(nodes), n=n, c=c,
                 out_size=out_size, bns=(bns1, bns2))
    tensors = ([relu_h] + ([] if even is None else [even]) + [op[1].weight for op in ops] + [op[2].weight for op in ops]
               + [op[5].weight for _, _, op in seps] + [op[6].weight for _, _, op in seps] + scales)
    return plan, tensors, nodes


def _first_halves(inputs, ops, c: int, dtype: torch.dtype):
    """Each operation's first depthwise convolution, 1x1 and batch norm: the input it reads
    (0: the ReLU'd state, 1: its even pixels), its configuration (input height and width,
    kernel, stride, padding, dilation) and the output size they share; or None."""
    block_input, conf, out_sizes = [], [], set()
    for op in ops:
        dw, pw, bn = op[1], op[2], op[3]
        if not (_depthwise_ok(dw, c, dtype) and _pointwise_ok(pw, c, dtype) and _bn_ok(bn)):
            return None
        k, stride, padding, dilation = dw.kernel_size[0], dw.stride[0], dw.padding[0], dw.dilation[0]
        index = 0
        if reads_even_pixels(dw):
            if inputs[1] is None:
                return None
            index, stride, padding, dilation = 1, 1, padding // 2, 1
        h, w = inputs[index].shape[-2:]
        conf.append((h, w, k, stride, padding, dilation))
        block_input.append(index)
        out_sizes.add(tuple((size + 2 * padding - dilation * (k - 1) - 1) // stride + 1 for size in (h, w)))
    if len(out_sizes) != 1:
        return None
    return tuple(block_input), tuple(conf), out_sizes.pop()


def _second_halves(seps, out_size: tuple[int, int], c: int, dtype: torch.dtype):
    """The configurations of the separable convolutions' second depthwise convolutions
    (stride 1, "same" size), their 1x1 and batch norm checked; or None."""
    conf = []
    for op in seps:
        if len(op) != 8:
            return None
        dw, pw, bn = op[5], op[6], op[7]
        if not (_depthwise_ok(dw, c, dtype) and _pointwise_ok(pw, c, dtype) and _bn_ok(bn)) or dw.stride[0] != 1:
            return None
        k, padding, dilation = dw.kernel_size[0], dw.padding[0], dw.dilation[0]
        if 2 * padding != dilation * (k - 1):
            return None
        conf.append((*out_size, k, 1, padding, dilation))
    return tuple(conf)


def _depthwise_ok(conv: nn.Module, c: int, dtype: torch.dtype) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.bias is None and conv.groups == c and conv.in_channels == c
            and conv.out_channels == c and conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
            and conv.padding[0] == conv.padding[1] and conv.dilation[0] == conv.dilation[1]
            and isinstance(conv.padding[0], int) and conv.weight.dtype == dtype and conv.weight.is_contiguous())


def _pointwise_ok(conv: nn.Module, c: int, dtype: torch.dtype) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.bias is None and conv.groups == 1 and conv.kernel_size == (1, 1)
            and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.in_channels == c and conv.out_channels == c
            and conv.weight.dtype == dtype and conv.weight.is_contiguous())


def _bn_ok(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and bn.training and not bn.affine


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=CHANNELS_LAST)


@dataclass
class _Stage:
    """One stage of the fused node (the first half of every convolution, or the separable
    convolutions' second halves), as its forward left it: per block (``(blocks, N*H*W, C)``)
    the depthwise convolutions' outputs ``a``, the stacked 1x1 kernels ``w`` (out, in), their
    products ``y``, the batch norms' statistics and the outputs ``z`` that a later stage reads
    (of the first ``keep`` blocks; the others are only summed into the nodes, and are not kept
    for the backward); each block's batch-norm weight (its address, 0 for none) and whether a
    ReLU follows."""
    conf: tuple
    dw: tuple
    a: torch.Tensor
    w: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    scale_at: list[int]
    relu: list[bool]

    @classmethod
    def forward(cls, plan: _Plan, conf, x_at: list[int], dw, pw, scale_at: list[int], relu: list[bool],
                eps: float, keep: int) -> tuple["_Stage", torch.Tensor]:
        """Depthwise convolutions of the tensors at ``x_at`` (one C call), 1x1 convolutions
        (one batched product), batch norms (one C call); returns the stage and the outputs of
        its blocks from ``keep`` on."""
        k, n, c, (oh, ow) = len(conf), plan.n, plan.c, plan.out_size
        a = dw[0].new_empty(k, n * oh * ow, c)
        kernels.depthwise_blocks("forward", a.dtype, n, c, conf, x_at, [t.data_ptr() for t in dw], plan.out_size,
                                 kernels.block_pointers(a))
        w = torch.stack(pw).view(k, c, c)
        y = torch.bmm(a, w.transpose(1, 2))
        z, rest = y.new_empty(keep, *y.shape[1:]), y.new_empty(k - keep, *y.shape[1:])
        mean, invstd = y.new_empty(k, c), y.new_empty(k, c)
        kernels.bn_forward_blocks(a.dtype, kernels.block_pointers(y), n * oh * ow, c, scale_at, eps, relu,
                                  kernels.block_pointers(z) + kernels.block_pointers(rest), mean, invstd)
        return cls(conf, tuple(dw), a, w, y, z, mean, invstd, scale_at, relu), rest

    def norm_backward(self, grad_at: list[int], grad_scale_at: list[int], below: bool, start: int = 0):
        """The batch norms' backward of blocks ``start:``, given the addresses of their output
        gradients: their weights' gradients into ``grad_scale_at`` (0: not needed), and the
        gradient of the products ``y[start:]`` if ``below``, else None."""
        gy = torch.empty_like(self.y[start:]) if below else None
        m, c = self.y.shape[1:]
        blocks = self.y.shape[0] - start
        kernels.bn_backward_blocks(self.y.dtype, grad_at, kernels.block_pointers(self.y)[start:], m, c,
                                   self.scale_at[start:], self.mean[start:], self.invstd[start:], self.relu[start:],
                                   kernels.block_pointers(gy) if below else [0] * blocks, grad_scale_at[start:])
        return gy

    def conv_backward(self, plan: _Plan, gy: torch.Tensor, x_at: list[int], into: list[tuple[int, int, bool]],
                      need_weights: bool):
        """The 1x1 and depthwise convolutions' backward given ``gy``: the input gradients of the
        blocks in ``into`` (``(block, address, accumulate)``), and, if ``need_weights``, the
        depthwise and 1x1 kernels' gradients (else None, None); ``x_at``: each block's input."""
        n, c, dtype = plan.n, plan.c, gy.dtype
        ga = torch.bmm(gy, self.w)
        ga_at = kernels.block_pointers(ga)
        if into:
            kernels.depthwise_blocks("input_grad", dtype, n, c, [self.conf[b] for b, _, _ in into],
                                     [ga_at[b] for b, _, _ in into], [self.dw[b].data_ptr() for b, _, _ in into],
                                     plan.out_size, [at for _, at, _ in into], accumulate=[acc for *_, acc in into])
        if not need_weights:
            return None, None
        gpw = torch.bmm(gy.transpose(1, 2), self.a).unbind(0)
        gdw = [torch.empty_like(t) for t in self.dw]
        kernels.depthwise_blocks("weight_grad", dtype, n, c, self.conf, x_at, ga_at, plan.out_size,
                                 [g.data_ptr() for g in gdw])
        return gdw, gpw


class _MixedConvs(torch.autograd.Function):
    """See the module docstring. Arguments: the plan, the :class:`RunningStats` of the forward,
    then the tensors of :meth:`_Plan.unpack`; returns one tensor per output slot (node)."""

    @staticmethod
    def forward(ctx, plan: _Plan, stats: RunningStats, *tensors):
        inputs, dw1, pw1, dw2, pw2, scales = plan.unpack(tensors)
        k1, s = plan.blocks, plan.seps
        # the first depthwise convolution of every operation, its 1x1, its batch norm: the
        # separable convolutions' with a ReLU, the dilated ones' times their weights
        first, dilated = _Stage.forward(plan, plan.conf1, [inputs[i].data_ptr() for i in plan.block_input], dw1,
                                        pw1, [0] * s + [t.data_ptr() for t in scales[s:]],
                                        [True] * s + [False] * (k1 - s), plan.eps1, keep=s)
        second, separable = None, dilated[:0]
        if s:   # the separable convolutions' second halves, times their weights
            second, separable = _Stage.forward(plan, plan.conf2, kernels.block_pointers(first.z), dw2, pw2,
                                               [t.data_ptr() for t in scales[:s]], [False] * s, plan.eps2, keep=0)
        for stage, bns in ((first, plan.bns[0]), (second, plan.bns[1])):
            if stage is not None:
                for bn, mean, invstd in zip(bns, stage.mean, stage.invstd):
                    stats.add([bn], mean, invstd, stage.y.shape[1])
        finals = list(separable.unbind(0)) + list(dilated.unbind(0))
        ctx.save_for_backward(*tensors)
        ctx.plan, ctx.stages = plan, (first, second)
        ctx.set_materialize_grads(False)
        return tuple(_node_sum(plan, [finals[b] for b in range(k1) if plan.block_slot[b] == slot])
                     for slot in range(plan.n_slots))

    @staticmethod
    def backward(ctx, *grads):
        plan, (first, second) = ctx.plan, ctx.stages
        tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if torch.is_grad_enabled():   # create_graph: differentiate a differentiable recomputation
            return (None, None, *_recomputed_grads(plan, tensors, grads, needs))
        inputs, dw1, pw1, dw2, pw2, _ = plan.unpack(tensors)
        k1, s, n_in = plan.blocks, plan.seps, plan.n_inputs
        # what the running backward pass uses: the weights are all needed or none (weight or
        # architecture step); the inputs not where the pass ends above them
        need_in = [needs[i] and i in plan.block_input and engine_will_need(x) for i, x in enumerate(inputs)]
        weights_at = [i for i in range(n_in, n_in + 2 * k1 + 2 * s) if needs[i]]
        need_weights = bool(weights_at) and engine_will_need(tensors[weights_at[0]])
        need_scale = needs[n_in + 2 * k1 + 2 * s:]
        below = any(need_in) or need_weights
        grads = [_channels_last(g) if g is not None else _channels_last(first.y.new_zeros(plan.n, plan.c, *plan.out_size))
                 for g in grads]
        slot_grad = [grads[plan.block_slot[b]].data_ptr() for b in range(k1)]
        grad_scale = first.y.new_empty(k1, plan.c) if any(need_scale) else None
        scale_at = kernels.block_pointers(grad_scale) if grad_scale is not None else [0] * k1
        grad_in = [_channels_last(torch.empty_like(x)) if need else None for x, need in zip(inputs, need_in)]
        gdw1 = gpw1 = gdw2 = gpw2 = None
        gz1 = torch.empty_like(first.z) if below and s else None   # of the separable ones: stage 2's input
        if s and (below or any(need_scale[:s])):
            gy2 = second.norm_backward(slot_grad[:s], scale_at[:s], below)
            if below:
                into = [(b, at, False) for b, at in enumerate(kernels.block_pointers(gz1))]
                gdw2, gpw2 = second.conv_backward(plan, gy2, kernels.block_pointers(first.z), into, need_weights)
        start = 0 if below else s   # nothing below: only the dilated convolutions' weights
        if start < k1 and (below or any(need_scale[s:])):
            grad_at = (kernels.block_pointers(gz1) if below and s else []) + slot_grad[s:]
            gy1 = first.norm_backward(grad_at, [0] * s + scale_at[s:], below, start)
            if below:
                into, seen = [], set()
                for b, i in enumerate(plan.block_input):
                    if need_in[i]:
                        into.append((b, grad_in[i].data_ptr(), i in seen))
                        seen.add(i)
                gdw1, gpw1 = first.conv_backward(plan, gy1, [inputs[i].data_ptr() for i in plan.block_input], into,
                                                 need_weights)
        result = list(grad_in)
        result += list(gdw1) if gdw1 is not None else [None] * k1
        result += [g.view(w.shape) for g, w in zip(gpw1, pw1)] if gpw1 is not None else [None] * k1
        result += list(gdw2) if gdw2 is not None else [None] * s
        result += [g.view(w.shape) for g, w in zip(gpw2, pw2)] if gpw2 is not None else [None] * s
        result += [grad_scale[b] if need else None for b, need in enumerate(need_scale)]
        return (None, None, *(g if need else None for g, need in zip(result, needs)))


def _node_sum(plan: _Plan, terms: list[torch.Tensor]) -> torch.Tensor:
    """The sum of ``terms`` (``(N*H*W, C)`` rows) as a new channels_last tensor: a node's share
    of the state's convolutions, which the node's sum then takes as its own."""
    out = torch.empty((plan.n, plan.c, *plan.out_size), dtype=terms[0].dtype, memory_format=CHANNELS_LAST)
    rows = out.permute(0, 2, 3, 1).view(-1, plan.c)
    if len(terms) == 1:
        rows.copy_(terms[0])
    else:
        torch.add(terms[0], terms[1], out=rows)
        for t in terms[2:]:
            rows.add_(t)
    return out


def _recompute(plan: _Plan, tensors) -> list[torch.Tensor]:
    """The fused node's outputs from PyTorch's differentiable operations (for double backward);
    the batch norms in training mode without running statistics."""
    inputs, dw1, pw1, dw2, pw2, scales = plan.unpack(tensors)
    s, c = plan.seps, plan.c
    outs: list = [None] * plan.n_slots
    for b in range(plan.blocks):
        _, _, _, stride, padding, dilation = plan.conf1[b]
        y = F.conv2d(inputs[plan.block_input[b]], dw1[b], None, stride, padding, dilation, c)
        if b < s:
            y = F.batch_norm(F.conv2d(y, pw1[b]), None, None, None, None, True, 0.0, plan.eps1).relu()
            _, _, _, _, padding, dilation = plan.conf2[b]
            y = F.conv2d(F.conv2d(y, dw2[b], None, 1, padding, dilation, c), pw2[b])
            y = F.batch_norm(y, None, None, scales[b], None, True, 0.0, plan.eps2)
        else:
            y = F.batch_norm(F.conv2d(y, pw1[b]), None, None, scales[b], None, True, 0.0, plan.eps1)
        slot = plan.block_slot[b]
        outs[slot] = y if outs[slot] is None else outs[slot] + y
    return outs


def _recomputed_grads(plan: _Plan, tensors, grads, needs) -> list[torch.Tensor | None]:
    """The fused node's gradients as a differentiable function of its inputs (double backward).

    The recomputation starts from a fresh alias of each input (``view_as``), and the gradients
    are taken with respect to the aliases: taken with respect to the inputs themselves, the
    engine would also run the graph above them wherever one input lies above another (a state
    computed from the cell's earlier operations, which share the architecture weights' node),
    and add those paths to the gradients."""
    wanted = [i for i, need in enumerate(needs) if need]
    with torch.enable_grad():
        aliases = [t.view_as(t) if need else t for t, need in zip(tensors, needs)]
        outs = _recompute(plan, aliases)
        grads = [torch.zeros_like(o) if g is None else g for g, o in zip(grads, outs)]
        got = torch.autograd.grad(outs, [aliases[i] for i in wanted], grads, create_graph=True, allow_unused=True)
    result: list = [None] * len(needs)
    for i, g in zip(wanted, got):
        result[i] = g
    return result
