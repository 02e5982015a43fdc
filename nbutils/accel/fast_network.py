"""A faster DARTS evaluation network on the CPU: the same function, the same parameters as
``EvalNetwork``.

``FastEvalNetwork`` subclasses :class:`nbutils.space.network.EvalNetwork` and keeps every
module, parameter and buffer of it (``state_dict`` is interchangeable both ways; the same
constructor under the same seed initialises the same weights); only the forward computation
is rewritten, from the pieces the supernet is built from
(:mod:`nbutils.accel.channels_last`, :mod:`~nbutils.accel.depthwise`, :mod:`~nbutils.accel.batch_norm`,
:mod:`~nbutils.accel.operations`). :func:`accelerate` turns a
built network into one (sharing its modules) where :func:`applies` says the fast path runs, and
is the single entry point for a training loop.

What makes it faster (``benchmarks/retrain_speed.py`` measures it; figures in
``benchmarks/README.md``):

* **channels_last** activations throughout (oneDNN's depthwise convolutions and pools are much
  faster in NHWC), the batch norms on the C kernels of
  :mod:`nbutils.accel.channels_last_kernels` (PyTorch's kernels without a C compiler), the
  ReLU inside SepConv and in the auxiliary head fused into the batch norm before it.
* **depthwise convolutions with the supernet's hand-written backward**: oneDNN's own backward
  is slow for most depthwise shapes and dominates the plain network's step. The stride-1
  convolutions that read one state go through one autograd node, which sums their input
  gradients in place.
* **work shared between the operations that read the same state**: its ReLU once for every
  convolution and FactorizedReduce on it (and for the next two cells' preprocessings and the
  auxiliary head, which all start with ReLU), its even and odd pixels once for the strided
  FactorizedReduce skips and dilated convolutions, and each kind of pool once (the evaluation
  cell's pools have no batch norm, so equal pools of one state give equal outputs).
* **drop path folded into the node sums**: each operation's output is scaled by its per-sample
  factor ``mask / keep`` in place and the second one added with ``addcmul_``, no further
  tensor per operation; the node's gradient is handed on densely laid out (the supernet's
  dense node gradients).
* **running statistics updated once per forward**, with ``torch._foreach_*`` calls.

Drop path draws exactly what the plain network draws: one ``bernoulli_(1 - p)`` on an
``(N, 1, 1, 1)`` tensor of the activations' dtype per operation that is not an identity, cell
after cell, in the genotype's order (the plain network draws each right after its operation,
and nothing in between draws random numbers). Under the same generator state the two
networks therefore drop the same samples; the factor is ``mask / keep`` where the plain
network computes ``x / keep * mask`` (equal up to rounding).

The plain auxiliary head starts with an in-place ReLU on the cell output it reads. Every other
reader of that output starts with ReLU too, except the global pooling when the head sits on the
last cell (3 cells): there the plain network pools the ReLU'd output in training mode, and so
does this one.

The batch norms' training/eval behaviour is the plain one: batch statistics and running
statistics updated (momentum, unbiased variance, ``num_batches_tracked``) in train mode, running
statistics in eval mode. Float64 agrees with the plain network to ~1e-12
(``tests/test_fast_network.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..space.network import EvalCell, EvalNetwork
from ..space.ops import DilConv, FactorizedReduce, Identity, SepConv
from .batch_norm import RunningStats, batch_norm, pointwise_batch_norm
from .channels_last import CHANNELS_LAST, DenseGrad, EvenOdd, on_c_kernels
from .depthwise import depthwise_fanout, reads_even_pixels
from .operations import dil_conv, factorized_reduce, pool, preprocess, sep_conv

__all__ = ["FastEvalNetwork", "accelerate", "applies"]


def applies(network: nn.Module) -> bool:
    """Whether :func:`accelerate` gives ``network`` the fast forward: an ``EvalNetwork`` whose
    parameters are float32 or float64 CPU tensors (the pieces are tuned and tested on the CPU
    only)."""
    params = list(network.parameters())
    return (isinstance(network, EvalNetwork) and bool(params)
            and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params))


def accelerate(network: EvalNetwork) -> nn.Module:
    """``network`` with the fast forward where :func:`applies`, else ``network`` itself.

    The result is a :class:`FastEvalNetwork` holding the very submodules of ``network`` (the
    same parameters and buffers, the same ``state_dict`` keys, ``drop_path_prob`` copied):
    train it in place of ``network``. Its own attributes (training mode, ``drop_path_prob``)
    are its own; the submodules' are shared."""
    if isinstance(network, FastEvalNetwork) or not applies(network):
        return network
    fast = FastEvalNetwork.__new__(FastEvalNetwork)
    for key, value in network.__dict__.items():
        # the registries (_parameters, _buffers, _modules, hooks) copied: the same entries,
        # but registering on one network later does not register on the other
        fast.__dict__[key] = type(value)(value) if isinstance(value, (dict, set)) else value
    return fast


# --------------------------------------------------------------------------- cell forward


class _Node:
    """The sum of a node's two operation outputs, each times its drop-path factor."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.owned = False   # whether ``total`` is a tensor of ours, which may be added to in place

    def add(self, h: torch.Tensor, owned: bool, factor: torch.Tensor | None) -> None:
        """Add ``h * factor`` (``factor`` per sample, None: 1). ``owned``: ``h`` is read by
        nothing else and saved by no backward, so it may be scaled in place."""
        if self.total is None:
            if factor is None:
                self.total, self.owned = h, owned
            else:
                self.total, self.owned = (h.mul_(factor) if owned else h * factor), True
        elif self.owned:
            self.total = self.total.add_(h) if factor is None else self.total.addcmul_(h, factor)
        else:
            self.total = (self.total + h) if factor is None else torch.addcmul(self.total, h, factor)
            self.owned = True

    def state(self, dense_grad: bool) -> torch.Tensor:
        """The node's tensor; ``dense_grad``: hand its gradient on densely laid out."""
        return DenseGrad.apply(self.total) if dense_grad and self.total.requires_grad else self.total


def _drop_factors(cell: EvalCell, like: torch.Tensor, drop_prob: float) -> list[torch.Tensor | None]:
    """Per operation, the per-sample factor ``mask / keep`` of drop path, or None (identity, or
    no drop path): the plain network's draws, in its order (see the module docstring)."""
    if drop_prob <= 0:
        return [None] * len(cell.ops)
    keep = 1.0 - drop_prob
    factors: list[torch.Tensor | None] = []
    for op in cell.ops:
        if isinstance(op, Identity):
            factors.append(None)
        else:
            mask = torch.empty(like.shape[0], 1, 1, 1, device=like.device, dtype=like.dtype).bernoulli_(keep)
            factors.append(mask.div_(keep))
    return factors


def _state_forward(cell: EvalCell, h: torch.Tensor, readers: list[int],
                   stats: RunningStats) -> list[tuple[int, torch.Tensor, bool]]:
    """The outputs of the operations ``readers`` (indices into ``cell.ops``), which all read the
    state ``h``: ``(index, output, owned)``."""
    outputs: list[tuple[int, torch.Tensor, bool]] = []
    convs: list[tuple[int, nn.Module]] = []    # sep and dil convolutions: their first depthwise convolutions share relu_h
    reduces: list[tuple[int, FactorizedReduce]] = []
    pools: dict[tuple, list[tuple[int, nn.Module]]] = {}
    for k in readers:
        op = cell.ops[k]
        if isinstance(op, Identity):
            outputs.append((k, h, False))
        elif isinstance(op, (SepConv, DilConv)):
            convs.append((k, op))
        elif isinstance(op, FactorizedReduce):
            reduces.append((k, op))
        elif isinstance(op, (nn.MaxPool2d, nn.AvgPool2d)):   # equal pools (kind and settings) computed once
            pools.setdefault((type(op), repr(op)), []).append((k, op))
        else:  # pragma: no cover - genotypes hold no other operation; keep the plain semantics anyway
            outputs.append((k, op(h), True))
    if convs or reduces:
        relu_h = F.relu(h)
        on_even = [i for i, (_, op) in enumerate(convs) if reads_even_pixels(op[1])]
        on_all = [i for i in range(len(convs)) if i not in on_even]
        halves = EvenOdd.apply(relu_h) if on_even or reduces else None
        firsts = dict(zip(on_all, depthwise_fanout(relu_h, [convs[i][1][1] for i in on_all])))
        if on_even:
            firsts.update(zip(on_even, depthwise_fanout(halves[0], [convs[i][1][1] for i in on_even], on_even=True)))
        for i, (k, op) in enumerate(convs):
            outputs.append((k, (sep_conv if isinstance(op, SepConv) else dil_conv)(firsts[i], op, stats), True))
        for k, op in reduces:
            outputs.append((k, factorized_reduce(halves, op, stats), True))
    for uses in pools.values():
        pooled = pool(h, uses[0][1])
        for k, _ in uses:
            outputs.append((k, pooled, len(uses) == 1))
    return outputs


def _cell_forward(cell: EvalCell, relu_s0: torch.Tensor, relu_s1: torch.Tensor, drop_prob: float,
                  stats: RunningStats, dense_grads: bool = True) -> torch.Tensor:
    """One evaluation cell, from the ReLU of its two inputs; ``dense_grads``: see
    :class:`nbutils.accel.channels_last.DenseGrad`."""
    states = [preprocess(cell.preprocess0, relu_s0, stats), preprocess(cell.preprocess1, relu_s1, stats)]
    factors = _drop_factors(cell, states[1], drop_prob)
    steps = len(cell.ops) // 2
    nodes = [_Node() for _ in range(steps)]
    for j in range(2 + steps):
        if j >= 2:   # node j - 2 reads states before j only: it is complete
            states.append(nodes[j - 2].state(dense_grads))
        readers = [k for k, src in enumerate(cell.inputs) if src == j]
        for k, out, owned in _state_forward(cell, states[j], readers, stats):
            nodes[k // 2].add(out, owned, factors[k])
    return torch.cat([states[i] for i in cell.concat], dim=1)


def _whole_map_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a convolution whose kernel covers the whole map (the auxiliary head's 2x2
    convolution of its 2x2 map, output 1x1), as a matrix product: oneDNN's backward of it is
    several times slower than the product's."""
    if (conv.bias is None and conv.groups == 1 and conv.padding == (0, 0) and conv.dilation == (1, 1)
            and tuple(x.shape[-2:]) == tuple(conv.kernel_size) and x.is_contiguous(memory_format=CHANNELS_LAST)):
        n = x.shape[0]
        flat = x.permute(0, 2, 3, 1).reshape(n, -1)                       # (N, H * W * C), a view
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
        return F.linear(flat, weight).view(n, conv.out_channels, 1, 1)
    return conv(x).contiguous(memory_format=CHANNELS_LAST)


def _auxiliary(head: nn.Module, relu_x: torch.Tensor, stats: RunningStats) -> torch.Tensor:
    """The auxiliary head (ReLU, pool, 1x1 conv, BN, ReLU, 2x2 conv, BN, ReLU, linear) from the
    ReLU of its input, each ReLU fused into the batch norm before it."""
    _, pool_module, conv1, bn1, _, conv2, bn2, _ = head.features
    t = pointwise_batch_norm(pool_module(relu_x).contiguous(memory_format=CHANNELS_LAST), conv1, bn1, stats, relu=True)
    t = batch_norm(_whole_map_conv(t, conv2), bn2, stats, relu=True)
    return head.classifier(t.flatten(1))


class FastEvalNetwork(EvalNetwork):
    """``EvalNetwork`` with a faster forward (same modules, parameters, buffers and function)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        stats = RunningStats()
        conv, bn = self.stem
        out = batch_norm(conv(x.contiguous(memory_format=CHANNELS_LAST)).contiguous(memory_format=CHANNELS_LAST), bn, stats)
        relu_s0 = relu_s1 = F.relu(out)
        drop_prob = self.drop_path_prob if self.training else 0.0
        with_aux = self.auxiliary_head is not None and self.training
        aux = None
        last = len(self.cells) - 1
        for i, cell in enumerate(self.cells):
            # the last cell's gradient, from the global average pool, stays strided on PyTorch's
            # batch-norm kernels (their channels_last backward is inaccurate on it; see FastSuperNet)
            out = _cell_forward(cell, relu_s0, relu_s1, drop_prob, stats, dense_grads=i < last or on_c_kernels(out))
            reads_relu = i < last or (with_aux and i == self.aux_position)
            relu_out = F.relu(out) if reads_relu else None
            if with_aux and i == self.aux_position:
                aux = _auxiliary(self.auxiliary_head, relu_out, stats)
                if i == last:   # the plain head's in-place ReLU reaches the global pooling
                    out = relu_out
            relu_s0, relu_s1 = relu_s1, relu_out
        stats.apply()
        return self.classifier(self.global_pooling(out).flatten(1)), aux
