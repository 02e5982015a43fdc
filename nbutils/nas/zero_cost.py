"""The six training-free ("zero-cost") metrics that RoBoT combines.

``grad_norm, snip, grasp, fisher, synflow, jacob_cov`` with the definitions of
``SamsungLabs/zero-cost-nas`` (``foresight/pruners/measures/*.py`` summed as in
``foresight/pruners/predictive.py::find_measures``), which ``hzf1174/RoBoT`` vendors.
Written from those definitions, checked against values produced by running that code
(``tests/fixtures/zero_cost_known_answers.json``).

What the reference computes, and therefore what this module computes:

* Only ``nn.Conv2d`` and ``nn.Linear`` weights are scored (never biases, BN parameters or
  architecture parameters); a metric is the sum over those layers of the per-layer sum.
  A layer whose weight gets no gradient (not reached by the loss) contributes 0.
* The loss is the mean cross-entropy of the logits on one batch, never split (the reference
  splits a batch only after a CUDA out-of-memory error, which changes four of the values).
* ``grad_norm``   sum over layers of ``||dL/dW||_2`` (Frobenius norm of each weight's gradient).
* ``snip``        ``sum |W * dL/dW|`` (the reference's gradient w.r.t. a mask of ones).
* ``grasp``       ``sum -W * (H g)`` where ``g = dL/dW`` from a first forward (detached) and
  ``H g`` the gradient of ``sum_l <g_l, dL/dW_l>`` through a second forward (T = 1, one
  iteration).
* ``fisher``      per output channel ``k`` of each layer output ``a``:
  ``0.5 * mean_n (sum_{h,w} a * dL/da)^2``; each channel's value is counted once per weight
  of that channel (the reference broadcasts it to ``W[k]``), i.e. weighted by
  ``prod(W.shape[1:])``. Always in train mode (the reference calls ``net.train()``).
* ``synflow``     BatchNorm (1d/2d) layers replaced by the identity, every floating parameter
  and buffer made absolute, float64, one input of ones ``[1, C, H, W]``, backpropagate the
  sum of the logits, ``sum |W * dR/dW|``. ``synflow_bn`` (not in :data:`METRICS`) keeps the
  BN layers: that is the ``synflow_bn`` measure of the reference and what RoBoT's DARTS
  script actually computes (it calls the measure function directly, without the BN-free
  copy).
* ``jacob_cov``   ``J`` = gradient of the summed logits w.r.t. the input batch (one backward
  through the batched forward), one row per sample; correlation matrix of the rows;
  eigenvalues ``v``; ``-sum(log(v + 1e-5) + 1 / (v + 1e-5))``.

Mode: the reference scores a network in train mode (the NAS-Bench models' copy calls
``train()``; RoBoT scores freshly built, hence training, networks); ``fisher`` forces train
mode in any case. ``train_mode=False`` scores the others in eval mode. Drop path is switched
off on the copy (RoBoT sets ``drop_path_prob = 0`` before scoring).

Departures, none of which changes a value the reference defines:

* The given network is never modified: every metric works on a deep copy (the reference
  also copies, but mutates the *input batch*: ``jacob_cov`` leaves ``requires_grad`` and an
  accumulating ``.grad`` on it, which in RoBoT's loop over 60k architectures makes each
  architecture's ``jacov`` include the input gradients of all earlier ones).
* Gradients are taken with ``torch.autograd.grad`` instead of ``.backward()`` and monkey-
  patched forwards; eigenvalues with ``eigvalsh`` (the matrix is symmetric) instead of
  ``eig``; per-layer sums are accumulated in float64.
* A value that is not a finite number is reported as *undefined*: ``nan`` in the values and
  the reason in ``.undefined`` (the reference prints the exception and returns ``nan``, or
  returns ``nan``/``inf``/a complex number silently).
* A layer called more than once per forward contributes to ``fisher`` once per call (the
  reference fails on such a network).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.device import resolve_device

#: The six metrics RoBoT uses, in the order they are reported.
METRICS: tuple[str, ...] = ("grad_norm", "snip", "grasp", "fisher", "synflow", "jacob_cov")
ALL = METRICS
#: Also available on request: synflow with the BN layers kept (see the module docstring).
EXTRA_METRICS: tuple[str, ...] = ("synflow_bn",)
#: ``k`` of jacob_cov's score, as in the reference.
JACOB_COV_K = 1e-5

LogitsFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class MetricUndefined(ArithmeticError):
    """A metric has no value for this network and batch (the reason is the message)."""

    def __init__(self, metric: str, reason: str):
        super().__init__(f"{metric}: {reason}")
        self.metric = metric
        self.reason = reason


class MetricValues(dict):
    """``{metric: value}`` as floats; undefined metrics hold ``nan`` and are listed, with the
    reason, in :attr:`undefined` (so a ``nan`` is never mistaken for a number)."""

    def __init__(self, values: dict[str, float] | None = None, undefined: dict[str, str] | None = None):
        super().__init__(values or {})
        self.undefined: dict[str, str] = dict(undefined or {})

    @property
    def defined(self) -> dict[str, float]:
        return {k: v for k, v in self.items() if k not in self.undefined}

    def __repr__(self) -> str:
        return f"MetricValues({dict(self)!r}, undefined={self.undefined!r})"


def default_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network's logits: its output, or the first element of a tuple/list output
    (:class:`~nbutils.space.network.EvalNetwork` returns ``(logits, aux_logits)``)."""
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


# --------------------------------------------------------------------------- helpers


def scored_layers(model: nn.Module) -> list[nn.Module]:
    """The Conv2d and Linear layers, in module order, each once: the ones the metrics score."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _copy_for_scoring(model: nn.Module, device: torch.device, train: bool) -> nn.Module:
    net = copy.deepcopy(model).to(device)
    net.train(train)
    if hasattr(net, "drop_path_prob"):
        net.drop_path_prob = 0.0
    for p in net.parameters():
        p.grad = None
    return net


def _grads(outputs: torch.Tensor, weights: Sequence[torch.Tensor], **kwargs) -> list[torch.Tensor | None]:
    wanted = [i for i, w in enumerate(weights) if w.requires_grad]
    result: list[torch.Tensor | None] = [None] * len(weights)
    if wanted:
        got = torch.autograd.grad(outputs, [weights[i] for i in wanted], allow_unused=True, **kwargs)
        for i, g in zip(wanted, got):
            result[i] = g
    return result


def _sum64(terms: Iterable[torch.Tensor | float]) -> float:
    total = 0.0
    for t in terms:
        total += float(t.double().sum().item()) if isinstance(t, torch.Tensor) else float(t)
    return total


def _check_finite(name: str, value: float) -> float:
    if isinstance(value, complex) or not math.isfinite(value):
        raise MetricUndefined(name, f"the value is not a finite number ({value})")
    return float(value)


# --------------------------------------------------------------------------- the metrics


def _loss(net: nn.Module, logits_fn: LogitsFn, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_fn(net, images), labels)


def grad_norm(net: nn.Module, images, labels, logits_fn: LogitsFn = default_logits) -> float:
    """Sum over Conv2d/Linear layers of the L2 norm of the loss gradient of the weight.
    ``net`` is used as given (mode included) and may be modified: pass a copy."""
    weights = [m.weight for m in scored_layers(net)]
    grads = _grads(_loss(net, logits_fn, images, labels), weights)
    return _check_finite("grad_norm", _sum64(g.norm() for g in grads if g is not None))


def snip(net: nn.Module, images, labels, logits_fn: LogitsFn = default_logits) -> float:
    """``sum |W * dL/dW|`` over Conv2d/Linear weights. Like the reference's mask of ones, a
    weight that does not require grad is scored too. ``net`` may be modified: pass a copy."""
    weights = [m.weight for m in scored_layers(net)]
    for w in weights:
        w.requires_grad_(True)
    grads = _grads(_loss(net, logits_fn, images, labels), weights)
    return _check_finite("snip", _sum64((w.detach() * g).abs() for w, g in zip(weights, grads) if g is not None))


def grasp(net: nn.Module, images, labels, logits_fn: LogitsFn = default_logits) -> float:
    """``sum -W * (H g)`` over Conv2d/Linear weights, ``g`` the (detached) loss gradient of a
    first forward, ``H g`` through a second forward (T = 1, one iteration, as the reference).
    ``net`` may be modified: pass a copy."""
    weights = [m.weight for m in scored_layers(net)]
    for w in weights:
        w.requires_grad_(True)
    g_first = _grads(_loss(net, logits_fn, images, labels), weights)
    g_second = _grads(_loss(net, logits_fn, images, labels), weights, create_graph=True)
    z = None
    for g1, g2 in zip(g_first, g_second):
        if g1 is not None and g2 is not None:
            term = (g1.detach() * g2).sum()
            z = term if z is None else z + term
    if z is None:
        raise MetricUndefined("grasp", "no Conv2d/Linear weight receives a gradient from the loss")
    hg = _grads(z, weights)
    return _check_finite("grasp", _sum64(-w.detach() * h for w, h in zip(weights, hg) if h is not None))


def fisher(net: nn.Module, images, labels, logits_fn: LogitsFn = default_logits) -> float:
    """Per output channel ``0.5 * mean_n (sum_{h,w} a * dL/da)^2`` of every Conv2d/Linear
    output ``a``, counted once per weight of the channel. Sets ``net`` to train mode, as the
    reference does. ``net`` may be modified: pass a copy."""
    net.train()
    layers = scored_layers(net)
    captured: list[tuple[int, torch.Tensor]] = []

    def hook_for(index: int):
        def hook(module, inputs, output):
            captured.append((index, output))
        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        loss = _loss(net, logits_fn, images, labels)
    finally:
        for h in handles:
            h.remove()
    needs = [(i, a) for i, a in captured if a.requires_grad]
    per_layer = [0.0] * len(layers)
    if needs:
        grads = torch.autograd.grad(loss, [a for _, a in needs], allow_unused=True)
        for (i, act), grad in zip(needs, grads):
            if grad is None:
                continue
            act, grad = act.detach(), grad.detach()
            g_nk = (act * grad).sum(dim=tuple(range(2, act.dim()))) if act.dim() > 2 else act * grad
            del_k = g_nk.pow(2).mean(0).mul(0.5).abs()
            fan_in = math.prod(layers[i].weight.shape[1:])
            per_layer[i] += float(del_k.double().sum().item()) * fan_in
    return _check_finite("fisher", sum(per_layer))


def _without_batchnorm(net: nn.Module) -> None:
    """Replace every BatchNorm1d/2d (the two kinds the reference disables) by the identity."""
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
                setattr(module, child_name, nn.Identity())


def synflow(net: nn.Module, input_shape: Sequence[int], logits_fn: LogitsFn = default_logits, bn: bool = False) -> float:
    """``sum |W * dR/dW|`` with ``R`` the summed logits of one all-ones input of shape
    ``[1, *input_shape]``, BN layers removed (unless ``bn``), all floating parameters and
    buffers made absolute, float64. ``net`` is modified: pass a copy."""
    name = "synflow_bn" if bn else "synflow"
    if not bn:
        _without_batchnorm(net)
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    net.double()
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    ones = torch.ones([1, *input_shape], dtype=torch.float64, device=device)
    weights = [m.weight for m in scored_layers(net)]
    grads = _grads(logits_fn(net, ones).sum(), weights)
    return _check_finite(name, _sum64((w.detach() * g).abs() for w, g in zip(weights, grads) if g is not None))


def jacob_cov_score(jacobians: np.ndarray, k: float = JACOB_COV_K) -> float:
    """``-sum(log(v + k) + 1/(v + k))`` over the eigenvalues ``v`` of the correlation matrix of
    the rows of ``jacobians`` (one row per sample). Raises :class:`MetricUndefined` where the
    reference would give ``nan`` (a constant row, or an eigenvalue ``<= -k``)."""
    jac = np.asarray(jacobians, dtype=np.float64)
    if jac.ndim != 2 or jac.shape[0] < 2:
        raise MetricUndefined("jacob_cov", f"needs at least two samples, got Jacobians of shape {jac.shape}")
    if np.any(~np.isfinite(jac)) or np.any(np.ptp(jac, axis=1) == 0):
        raise MetricUndefined(
            "jacob_cov",
            "the correlation matrix is undefined: a sample's input-Jacobian is constant or not finite",
        )
    with np.errstate(all="ignore"):
        corr = np.corrcoef(jac)
    if not np.all(np.isfinite(corr)):
        raise MetricUndefined("jacob_cov", "the correlation matrix of the input-Jacobians is not finite")
    v = np.linalg.eigvalsh((corr + corr.T) / 2)
    if np.any(v + k <= 0):
        raise MetricUndefined("jacob_cov", f"an eigenvalue of the correlation matrix is <= -k ({v.min():.3g})")
    return _check_finite("jacob_cov", float(-np.sum(np.log(v + k) + 1.0 / (v + k))))


def jacob_cov(net: nn.Module, images, labels=None, logits_fn: LogitsFn = default_logits) -> float:
    """jacob_cov of one batch (``labels`` unused). ``net`` is used as given: pass a copy."""
    x = images.detach().clone().requires_grad_(True)
    (jac,) = torch.autograd.grad(logits_fn(net, x).sum(), [x])
    return jacob_cov_score(jac.reshape(jac.shape[0], -1).detach().cpu().numpy())


# --------------------------------------------------------------------------- entry point


def _resolve(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is None:
        return next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(device, str) and device in ("auto", "cpu", "cuda"):
        return resolve_device(device)
    return torch.device(device)


def compute_metrics(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    metrics: Sequence[str] = METRICS,
    device: str | torch.device | None = None,
    *,
    logits_fn: LogitsFn | None = None,
    train_mode: bool = True,
    strict: bool = False,
) -> MetricValues:
    """The requested metrics of ``model`` on one batch, as ``{name: float}``.

    ``images`` are normalised float ``N x C x H x W``, ``labels`` int64 ``N``. ``model`` is
    not modified (its parameters, buffers, ``requires_grad`` flags, gradients and mode are
    left as they were): the metrics work on deep copies on ``device`` (default: the model's).
    ``logits_fn(net, x)`` returns the logits (default: the output, or its first element when
    the network returns a tuple). An undefined metric is ``nan`` in the result and listed with
    its reason in ``result.undefined``; ``strict=True`` raises :class:`MetricUndefined`
    instead.
    """
    known = METRICS + EXTRA_METRICS
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; allowed: {', '.join(known)}")
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected images N x C x H x W and labels N, got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    logits_fn = logits_fn or default_logits
    dev = _resolve(device, model)
    images = images.detach().to(dev)
    labels = labels.detach().to(dev)
    result = MetricValues()
    functions = {"grad_norm": grad_norm, "snip": snip, "grasp": grasp, "fisher": fisher, "jacob_cov": jacob_cov}
    for name in metrics:
        # a fresh copy per metric, as the reference: no metric sees another's side effects
        net = _copy_for_scoring(model, dev, True if name == "fisher" else train_mode)
        try:
            if name in ("synflow", "synflow_bn"):
                value = synflow(net, images.shape[1:], logits_fn, bn=(name == "synflow_bn"))
            else:
                value = functions[name](net, images, labels, logits_fn)
            result[name] = value
        except MetricUndefined as err:
            if strict:
                raise
            result[name] = float("nan")
            result.undefined[name] = err.reason
        finally:
            del net
    return result
