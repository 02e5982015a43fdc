"""DARTS' second-order (unrolled) architecture gradient, as the reference computes it
(``architect.py``, ``_backward_step_unrolled``): the validation loss's gradient in alpha after one
virtual SGD step of the weights, minus the implicit term, a finite difference of the training
loss's alpha gradient around the current weights. :func:`nbutils.nas.darts.architecture_step`
takes it when ``order`` is 2.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..space.supernet import SuperNet

Batch = tuple[torch.Tensor, torch.Tensor]


class _Split:
    """A supernet's parameters split into alphas and weights, and its loss at other weights: every
    forward runs through ``torch.func.functional_call`` on copies of the BN buffers, so neither
    the weights nor the BN running statistics of the model change."""

    def __init__(self, model: SuperNet):
        arch_ids = {id(a) for a in model.arch_parameters()}
        named = list(model.named_parameters())
        self.model = model
        self.alphas = {name: p for name, p in named if id(p) in arch_ids}
        self.weight_names = [name for name, p in named if id(p) not in arch_ids]
        self.weights = [p for name, p in named if id(p) not in arch_ids]
        self.buffers = dict(model.named_buffers())

    def loss_at(self, values: Sequence[torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> Batch:
        state = {**self.alphas, **dict(zip(self.weight_names, values)),
                 **{n: b.clone() for n, b in self.buffers.items()}}
        logits = torch.func.functional_call(self.model, state, (inputs,))
        return F.cross_entropy(logits, targets), logits

    def alpha_grad(self, loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(loss, list(self.alphas.values()), materialize_grads=True)


def unrolled_alpha_grad(
    model: SuperNet,
    train_batch: Batch,
    val_batch: Batch,
    *,
    eta: float,
    momentum: float,
    weight_decay: float,
    momentum_buffers: Sequence[torch.Tensor | None] | None = None,
    r: float = 0.01,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The second-order (unrolled) architecture gradient of the reference.

    1. ``w' = w - eta * (momentum * buffer + dL_train(w)/dw + weight_decay * w)`` on the
       training batch (a missing momentum buffer counts as zero);
    2. ``dalpha = dL_val(w', alpha)/dalpha`` and ``v = dL_val(w', alpha)/dw'`` on the
       validation batch;
    3. with ``R = r / ||v||``: ``implicit = (dL_train(w + Rv)/dalpha - dL_train(w - Rv)/dalpha) / 2R``;
    4. returns ``dalpha - eta * implicit``, with ``L_val(w')`` and its logits.

    ``momentum_buffers`` follow ``model.weights()``. Neither the weights nor the BN running
    statistics of ``model`` change (:class:`_Split`). The two finite-difference forwards draw
    the same random numbers (the same dropout masks, when skip dropout is on).
    """
    x_val, y_val = val_batch
    split = _Split(model)
    unrolled = virtual_step(split, train_batch, momentum_buffers, eta=eta, momentum=momentum,
                            weight_decay=weight_decay)
    # 2. the validation loss at the unrolled weights
    loss_val, logits_val = split.loss_at(unrolled, x_val, y_val)
    grads = torch.autograd.grad(loss_val, [*split.alphas.values(), *unrolled], materialize_grads=True)
    dalpha, v = grads[: len(split.alphas)], grads[len(split.alphas):]
    implicit = scaled_implicit_term(split, v, train_batch, r, eta)
    if implicit is None:   # the validation loss is flat in the weights: no implicit term
        return [d.detach() for d in dalpha], loss_val.detach(), logits_val.detach()
    final = [d - term for d, term in zip(dalpha, implicit)]
    return [f.detach() for f in final], loss_val.detach(), logits_val.detach()


def virtual_step(split: _Split, train_batch: Batch, momentum_buffers: Sequence[torch.Tensor | None] | None, *,
                 eta: float, momentum: float, weight_decay: float) -> list[torch.Tensor]:
    """Step 1: the weights after one virtual SGD step on the training batch (leaves that require grad)."""
    x, y = train_batch
    grads_w = torch.autograd.grad(split.loss_at(split.weights, x, y)[0], split.weights, materialize_grads=True)
    if momentum_buffers is None:
        momentum_buffers = [None] * len(split.weights)
    with torch.no_grad():
        unrolled = []
        for w, g, buf in zip(split.weights, grads_w, momentum_buffers, strict=True):
            step = g + weight_decay * w
            if buf is not None:
                step = step + momentum * buf
            unrolled.append((w - eta * step).requires_grad_())
    return unrolled


def scaled_implicit_term(split: _Split, v: Sequence[torch.Tensor], train_batch: Batch, r: float, eta: float
                         ) -> list[torch.Tensor] | None:
    """Steps 3 and 4's ``eta * implicit``, ``eta * (dL_train(w + Rv)/dalpha - dL_train(w - Rv)/dalpha) / 2R``
    with ``R = r / ||v||``: a central finite difference along ``v`` around the current weights,
    computed in the reference's order; None when ``v`` is 0."""
    x, y = train_batch
    norm = torch.cat([t.flatten() for t in v]).norm()
    if not norm > 0:
        return None
    radius = r / norm
    with torch.no_grad():
        w_plus = [w + radius * t for w, t in zip(split.weights, v)]
        w_minus = [w - radius * t for w, t in zip(split.weights, v)]
    with _replayed_randomness(x.device):
        grad_plus = split.alpha_grad(split.loss_at(w_plus, x, y)[0])
    grad_minus = split.alpha_grad(split.loss_at(w_minus, x, y)[0])
    return [eta * (gp - gm) / (2 * radius) for gp, gm in zip(grad_plus, grad_minus)]


def _replayed_randomness(device: torch.device):
    """Fork the random state: the draws made inside the block are made again after it."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)
