"""TE-NAS's two training-free indicators: the NTK condition number and the linear-region count.

Written from ``VITA-Group/TENAS`` (``lib/procedures/ntk.py::get_ntk_n`` and
``lib/procedures/linear_region_counter.py``) and checked against values produced by running
that code (``tests/fixtures/zero_cost_known_answers.json``).

NTK condition number (``get_ntk_n`` with ``train_mode=True``, as ``prune_tenas.py`` calls it):
the network in train mode (BN normalises with the statistics of the batch, so the samples of
a batch are coupled) runs ONE forward over the batch; for each sample ``i`` the gradient of
its summed logits ``sum_k f_ik`` w.r.t. every parameter whose name contains ``'weight'`` and
that receives a gradient (conv and linear weights, *and affine BN weights*; never biases or
architecture parameters) is flattened into row ``i`` of ``G``; ``NTK = G G^T``;
``kappa = lambda_max / lambda_min``. With several batches the rows of all batches are stacked
(each batch has its own forward) into one NTK. The caller repeats the measurement and averages
(``prune_tenas.py``: ``--repeat 3``).

* :func:`ntk_condition_number_loop` is the reference's procedure, one backward per sample
  through the batched forward: the executable specification.
* :func:`ntk_condition_number` computes the same rows from the same batched forward in one
  backward, one of two ways (:func:`choose_method`): ``"vmap"``, for any network, vectorises
  the backward (``torch.autograd.grad(..., is_grads_batched=True)``: vmap over the rows of
  the identity as output gradients); ``"replicas"``, for TE-NAS networks
  (:mod:`nbutils.nas.ntk_replicas`), evaluates one replica of the network per row, each with its
  own copy of the weights, and takes one ordinary backward. Neither is a per-sample forward:
  batch norm sees the whole batch.

Speed (``benchmarks/ntk_speed.py`` measures the three against each other; the figures, and
the alternatives tried and dropped, are in ``benchmarks/README.md``): both batched ways are
faster than the loop; replicas are the fastest on TE-NAS's 32x32 images and on 16x16, vmap
on 8x8, so ``method="auto"`` takes replicas from :data:`REPLICAS_MIN_PIXELS` on. The loop is
not dominated by per-call overhead that batching removes: at C=1 the native convolution
kernels are compute-bound per sample, and most of vmap's time is the convolution backward,
which ``is_grads_batched`` (the legacy vmap) still runs once per row; replicas turn those into
channels_last calls over R times the channels (one replica per row) and the depthwise weight
gradient into one matrix product.

Departures from the reference, deliberate:

* Undefined values are reported, never replaced by a number. The reference returns
  ``nan_to_num(lambda_max / lambda_min, nan=100000)``: a singular NTK gives a meaningless huge,
  negative or infinite "condition number" and ``0/0`` gives 100000. Here ``kappa`` is ``nan``
  and ``undefined`` says why when the NTK is zero, when ``lambda_min <= 0``, or when
  ``lambda_min <= rtol * lambda_max`` with ``rtol = N * eps(dtype of G)`` by default (below
  that, ``lambda_min`` is rounding noise of a singular matrix; pass ``rtol=0`` for the sign
  test only). Note: a network whose last layer before global pooling is a BN without a
  following ReLU (the DARTS search network, :class:`~nbutils.space.supernet.SuperNet`) has an
  exactly singular train-mode NTK: every channel has zero batch mean, the batch-summed logits
  do not depend on the weights, so the rows of ``G`` sum to zero. TE-NAS's own supernet ends
  with BN + ReLU (``lastact``), which avoids this; a TE-NAS search on our supernet needs the
  same.
* ``G G^T`` and its eigenvalues are computed in float64 (the reference: float32 ``symeig``).
* The given network is not modified (the reference updates BN running statistics and leaves
  gradients behind): the reference loop runs on a deep copy; the batched NTK and the region
  count run on the network itself with batch-norm running statistics frozen and every mode
  restored afterwards (a deep copy of a TE-NAS supernet can cost more than its NTK on small
  images).
  Drop path is off during the computation.
* Logits: the output, or its first element for a tuple output (our
  :class:`~nbutils.space.network.EvalNetwork` returns ``(logits, aux)``; TE-NAS's networks return
  ``(features, logits)`` and the reference takes element 1). Pass ``logits_fn`` otherwise.

Linear regions (``Linear_Region_Collector`` / ``LinearRegionCount``): forward hooks on every
``nn.ReLU`` module whose input is 4-D record ``output > 0``; a sample's activation pattern is
the concatenation over those ReLU calls; the batches are forwarded one by one (train mode: BN
uses each batch's statistics) and the count is the number of distinct patterns over all
samples of all batches. TE-NAS uses 3 batches of 1000 random 3x3 single-channel crops of the
(normalised) training images (:func:`region_inputs`) and a thin network (``C=1``, no stem).
The reference returns ``sum_i 1 / #{j : pattern_j == pattern_i}`` in float32 (e.g.
``60.0000076``); :func:`linear_regions` returns the exact integer it approximates.

How ``prune_tenas.py`` / ``prune_launch.py`` use them in the DARTS space on CIFAR-10
(implemented in :mod:`nbutils.nas.tenas`): NTK on ONE batch of 14 training images (32x32x3, the loader's
augmentation) through a supernet with ``C=1``, 2 cells (normal, reduction), stem multiplier 1,
affine BN, BN + ReLU before pooling, pruned operations skipped (weight <= 0.01); regions on
the thin version (``C=1``, 2 cells, no stem) with 3 batches of 1000 crops. Each of
``--repeat 3`` repetitions draws a new batch; the launcher's ``--init kaiming_normal`` matches
no branch of ``init_model`` (which knows ``kaiming_norm_fanin/_fanout``), so the networks keep
PyTorch's default initialisation and the repetitions do NOT re-initialise: within a pruning
round every candidate's NTK uses the weights of the one ``network_origin`` built for the round,
while every candidate's region count uses a freshly built (freshly initialised) thin network.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .ntk_replicas import replica_gradients, supports_replicas

LogitsFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Batches = torch.Tensor | Sequence[torch.Tensor]


def default_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output, or the first element of a tuple/list output."""
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


@dataclass(frozen=True)
class NTKResult:
    """``kappa`` is ``nan`` exactly when ``undefined`` (the reason) is set."""

    kappa: float
    eigenvalues: np.ndarray = field(repr=False)  # ascending, float64
    undefined: str | None
    num_samples: int
    num_parameters: int

    @property
    def defined(self) -> bool:
        return self.undefined is None


# --------------------------------------------------------------------------- shared pieces


def _as_batches(inputs: Batches) -> list[torch.Tensor]:
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not batches or any(not isinstance(b, torch.Tensor) or b.dim() < 2 or b.shape[0] == 0 for b in batches):
        raise ValueError("inputs must be a non-empty batch tensor N x ... or a sequence of them")
    return batches


def _working_copy(network: nn.Module, train_mode: bool) -> nn.Module:
    net = copy.deepcopy(network)
    net.train(train_mode)
    if hasattr(net, "drop_path_prob"):
        net.drop_path_prob = 0.0
    for p in net.parameters():
        p.grad = None
    return net


@contextmanager
def _measuring(network: nn.Module, train_mode: bool):
    """Use ``network`` itself for a measurement and leave it exactly as it was: every module's
    mode is set (and restored), drop path is off, and in training mode every batch-norm layer
    stops tracking running statistics for the duration (it normalises with the batch's
    statistics either way, so the values are those of a copy in training mode, and no buffer
    changes). Callers take gradients with ``torch.autograd.grad``, so no ``.grad`` is left
    behind. Far cheaper than a deep copy, which costs more than the measurement on a small
    network."""
    modules = list(network.modules())
    modes = [m.training for m in modules]
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)] if train_mode else []
    tracking = [m.track_running_stats for m in norms]
    drop_path = getattr(network, "drop_path_prob", None)
    try:
        for m in modules:
            if m.training != train_mode:
                m.training = train_mode
        for m in norms:
            m.track_running_stats = False
        if drop_path is not None:
            network.drop_path_prob = 0.0
        yield network
    finally:
        for m, training in zip(modules, modes):
            if m.training != training:
                m.training = training
        for m, flag in zip(norms, tracking):
            m.track_running_stats = flag
        if drop_path is not None:
            network.drop_path_prob = drop_path


def ntk_weight_names(network: nn.Module) -> list[str]:
    """Names of the parameters the NTK is taken over (before dropping those that get no
    gradient): every parameter whose name contains ``'weight'`` and that requires grad."""
    return [name for name, p in network.named_parameters() if "weight" in name and p.requires_grad]


def ntk_from_gradients(grads: torch.Tensor) -> np.ndarray:
    """``G G^T`` in float64 from the per-sample gradient rows ``G`` (N x P)."""
    g = grads.detach().to(torch.float64).cpu()
    return (g @ g.T).numpy()


def condition_number(ntk: np.ndarray, rtol: float | None = None, dtype: torch.dtype = torch.float32
                     ) -> tuple[float, np.ndarray, str | None]:
    """``(kappa, ascending eigenvalues, reason)``; ``kappa`` is nan when ``reason`` is set.

    Undefined when the matrix is not finite or zero, when ``lambda_min <= 0``, or when
    ``lambda_min <= rtol * lambda_max`` (default ``rtol = N * eps(dtype)``, ``dtype`` being the
    precision the gradients were computed in)."""
    ntk = np.asarray(ntk, dtype=np.float64)
    n = ntk.shape[0]
    if not np.all(np.isfinite(ntk)):
        return float("nan"), np.full(n, np.nan), "the NTK has non-finite entries"
    eig = np.linalg.eigvalsh((ntk + ntk.T) / 2)
    lo, hi = float(eig[0]), float(eig[-1])
    if rtol is None:
        rtol = n * float(torch.finfo(dtype).eps)
    if hi <= 0:
        return float("nan"), eig, "the NTK is zero: no weight receives a gradient from the logits"
    if lo <= 0:
        return float("nan"), eig, f"the NTK is singular: smallest eigenvalue {lo:.3g} <= 0 (largest {hi:.3g})"
    if lo <= rtol * hi:
        return float("nan"), eig, (
            f"the NTK is numerically singular: smallest eigenvalue {lo:.3g} <= {rtol:.2g} x largest {hi:.3g}"
        )
    return hi / lo, eig, None


def _result(grads: torch.Tensor, rtol: float | None) -> NTKResult:
    if not torch.all(torch.isfinite(grads)):
        return NTKResult(float("nan"), np.full(grads.shape[0], np.nan), "the weight gradients are not finite",
                         grads.shape[0], grads.shape[1])
    kappa, eig, reason = condition_number(ntk_from_gradients(grads), rtol, grads.dtype)
    return NTKResult(kappa, eig, reason, grads.shape[0], grads.shape[1])


# --------------------------------------------------------------------------- the reference loop


def per_sample_gradients_loop(network: nn.Module, inputs: Batches, *, train_mode: bool = True,
                              logits_fn: LogitsFn | None = None) -> torch.Tensor:
    """Rows ``G[i] = d(sum_k f_ik)/dW`` as the reference computes them: one batched forward per
    batch, then one ``backward`` per sample (``retain_graph``), collecting the gradients of the
    ``'weight'`` parameters that have one. ``network`` is not modified."""
    logits_fn = logits_fn or default_logits
    net = _working_copy(network, train_mode)
    named = [(n, p) for n, p in net.named_parameters() if "weight" in n]
    rows = []
    for batch in _as_batches(inputs):
        net.zero_grad(set_to_none=True)
        logits = logits_fn(net, batch.clone())
        for i in range(logits.shape[0]):
            logits[i : i + 1].backward(torch.ones_like(logits[i : i + 1]), retain_graph=True)
            rows.append(torch.cat([p.grad.reshape(-1).detach().clone() for _, p in named if p.grad is not None]))
            net.zero_grad(set_to_none=True)
        del logits
    return torch.stack(rows)


def ntk_condition_number_loop(network: nn.Module, inputs: Batches, *, train_mode: bool = True,
                              logits_fn: LogitsFn | None = None, rtol: float | None = None) -> NTKResult:
    """TE-NAS's NTK condition number, computed one backward per sample (the specification)."""
    return _result(per_sample_gradients_loop(network, inputs, train_mode=train_mode, logits_fn=logits_fn), rtol)


# --------------------------------------------------------------------------- the batched version


def _mostly_single_channel(net: nn.Module) -> bool:
    """True when the median Conv2d has at most 2 output channels (TE-NAS's C=1 networks)."""
    outs = sorted(m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d))
    return bool(outs) and outs[len(outs) // 2] <= 2


@contextmanager
def _mkldnn_enabled(enabled: bool):
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


#: how :func:`per_sample_gradients` computes the rows
METHODS = ("auto", "replicas", "vmap")
#: ``method="auto"`` uses replicas from this many pixels per image on (below, vmap is faster:
#: ``benchmarks/ntk_speed.py``, figures in ``benchmarks/README.md``)
REPLICAS_MIN_PIXELS = 16 * 16


def choose_method(network: nn.Module, inputs: Batches, *, method: str = "auto", train_mode: bool = True,
                  logits_fn: LogitsFn | None = None) -> str:
    """``"replicas"`` or ``"vmap"``: the way :func:`per_sample_gradients` computes the rows.

    ``"auto"`` takes replicas (:mod:`nbutils.nas.ntk_replicas`) for a TE-NAS network in train mode
    with the default logits on images of at least :data:`REPLICAS_MIN_PIXELS` pixels, where
    ``benchmarks/ntk_speed.py`` measures them faster, and vmap otherwise."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    eligible = train_mode and logits_fn is None and supports_replicas(network)
    if method == "replicas":
        if not eligible:
            raise ValueError("method='replicas' needs a TE-NAS network (nbutils.nas.tenas_network.TenasNetwork) in train mode "
                             "with the default logits; use method='vmap' or 'auto' for other networks")
        return method
    if method == "vmap":
        return method
    pixels = min(b.shape[-1] * b.shape[-2] for b in _as_batches(inputs))
    return "replicas" if eligible and pixels >= REPLICAS_MIN_PIXELS else "vmap"


def per_sample_gradients(network: nn.Module, inputs: Batches, *, train_mode: bool = True,
                         logits_fn: LogitsFn | None = None, chunk_size: int | None = None,
                         mkldnn: bool | None = None, method: str = "auto") -> torch.Tensor:
    """The same rows as :func:`per_sample_gradients_loop` from the same batched forward, all
    of them in one backward per batch (``chunk_size``: at most that many rows per backward;
    memory grows with it). ``network`` is not modified. Two ways (``method``, see
    :func:`choose_method`):

    * ``"vmap"``, any network: ``autograd.grad`` of the per-sample summed logits with the rows
      of the identity as ``grad_outputs`` (``is_grads_batched``, i.e. vmap over the backward).
      ``mkldnn`` chooses the CPU convolution backend meanwhile (the global setting is restored
      afterwards): ``None`` turns oneDNN off when the median convolution has at most 2 output
      channels, where PyTorch's native kernels are faster on the CPU (``benchmarks/ntk_speed.py
      --mkldnn on`` against ``off``; figures in ``benchmarks/README.md``), and leaves it alone
      otherwise. The choice only changes rounding.
    * ``"replicas"``, TE-NAS networks: the rows as replicas of the network with their own
      copies of the weights, in one ordinary backward (:mod:`nbutils.nas.ntk_replicas`)."""
    logits_fn = logits_fn or default_logits
    chosen = choose_method(network, inputs, method=method, train_mode=train_mode,
                           logits_fn=None if logits_fn is default_logits else logits_fn)
    weights = [p for name, p in network.named_parameters() if "weight" in name and p.requires_grad]
    use_mkldnn = torch.backends.mkldnn.enabled and (not _mostly_single_channel(network) if mkldnn is None else mkldnn)
    rows = []
    with _measuring(network, train_mode) as net:
        for batch in _as_batches(inputs):
            n = batch.shape[0]
            step = n if chunk_size is None else max(1, int(chunk_size))
            if chosen == "replicas":
                rows.extend(replica_gradients(net, batch, range(start, min(n, start + step)))
                            for start in range(0, n, step))
                continue
            with _mkldnn_enabled(use_mkldnn):
                summed = logits_fn(net, batch.clone()).reshape(n, -1).sum(1)
                for start in range(0, n, step):
                    r = min(step, n - start)
                    selector = torch.zeros(r, n, dtype=summed.dtype, device=summed.device)
                    selector[torch.arange(r), torch.arange(start, start + r)] = 1.0
                    grads = torch.autograd.grad(summed, weights, grad_outputs=selector, is_grads_batched=True,
                                                retain_graph=True, allow_unused=True)
                    rows.append(torch.cat([g.reshape(r, -1) for g in grads if g is not None], dim=1).detach())
                del summed
    return torch.cat(rows, dim=0)


def ntk_condition_number(network: nn.Module, inputs: Batches, *, train_mode: bool = True,
                         logits_fn: LogitsFn | None = None, rtol: float | None = None,
                         chunk_size: int | None = None, mkldnn: bool | None = None,
                         method: str = "auto") -> NTKResult:
    """TE-NAS's NTK condition number; equal to :func:`ntk_condition_number_loop` up to rounding
    (see :func:`per_sample_gradients`)."""
    grads = per_sample_gradients(network, inputs, train_mode=train_mode, logits_fn=logits_fn,
                                 chunk_size=chunk_size, mkldnn=mkldnn, method=method)
    return _result(grads, rtol)


def ntk_condition_numbers(networks: Sequence[nn.Module], inputs: Batches, **kwargs) -> list[NTKResult]:
    """Several networks on the same batches (``get_ntk_n(loader, networks)``)."""
    return [ntk_condition_number(net, inputs, **kwargs) for net in networks]


# --------------------------------------------------------------------------- linear regions


def activation_patterns(network: nn.Module, inputs: Batches, *, train_mode: bool = True) -> torch.Tensor:
    """Boolean ``samples x neurons``: ``output > 0`` of every call of an ``nn.ReLU`` module whose
    input is 4-D, concatenated in call order; the batches are forwarded one at a time (no
    gradients; ``network`` is left as it was)."""
    recorded: list[torch.Tensor] = []

    def hook(module, args, output):
        if isinstance(args, tuple) and args and args[0].dim() == 4:
            recorded.append((output.detach() > 0).reshape(output.shape[0], -1))

    handles = [m.register_forward_hook(hook) for m in network.modules() if isinstance(m, nn.ReLU)]
    patterns = []
    try:
        with torch.no_grad(), _measuring(network, train_mode) as net:
            for batch in _as_batches(inputs):
                recorded.clear()
                net(batch.clone())
                if not recorded:
                    raise ValueError("the network has no nn.ReLU module with a 4-D input: no activation pattern")
                patterns.append(torch.cat(recorded, dim=1).cpu())
    finally:
        for h in handles:
            h.remove()
    widths = {p.shape[1] for p in patterns}
    if len(widths) != 1:
        raise ValueError(f"the batches gave activation patterns of different lengths {sorted(widths)}")
    return torch.cat(patterns, dim=0)


def count_distinct(patterns: torch.Tensor) -> int:
    """Number of distinct rows of a boolean matrix."""
    packed = np.packbits(patterns.numpy().astype(np.uint8), axis=1)
    return len({row.tobytes() for row in packed})


def linear_regions(network: nn.Module, inputs: Batches, *, train_mode: bool = True) -> int:
    """TE-NAS's linear-region count: distinct ReLU activation patterns over all samples of all
    batches (see the module docstring)."""
    return count_distinct(activation_patterns(network, inputs, train_mode=train_mode))


def region_inputs(images: torch.Tensor, *, num_batches: int = 3, batch_size: int = 1000, crop: int = 3,
                  generator: torch.Generator | None = None, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> list[torch.Tensor]:
    """TE-NAS's inputs for the region count: ``num_batches`` batches of ``batch_size`` random
    ``crop x crop`` crops of one random channel (``1 x crop x crop``) of the images
    ``N x C x H x W``; images are drawn without replacement, as a shuffled loader does
    (reshuffled when exhausted).

    Without ``mean``/``std`` the images are taken as already normalised. With them (one value
    per channel), the images are pixel values 0..255 (e.g. an
    :class:`~nbutils.core.image_dataset.ImageDataset`'s uint8 images) and each crop is scaled to [0, 1] and
    normalised with the statistics of the channel it was cut from, as the reference's
    ``ToTensor, Normalize, RandChannel`` transform does; only the crops are converted."""
    if images.dim() != 4 or images.shape[-1] < crop or images.shape[-2] < crop:
        raise ValueError(f"images must be N x C x H x W with H, W >= {crop}, got {tuple(images.shape)}")
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size), ("crop", crop)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    n, c, h, w = images.shape
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together (or neither)")
    if mean is not None and (len(mean) != c or len(std) != c or any(not s > 0 for s in std)):
        raise ValueError(f"mean and std must have one value per channel ({c}), std positive; "
                         f"got {tuple(mean)}, {tuple(std)}")
    total = num_batches * batch_size
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-total // n))])[:total]
    top = torch.randint(0, h - crop + 1, (total,), generator=generator)
    left = torch.randint(0, w - crop + 1, (total,), generator=generator)
    channel = torch.randint(0, c, (total,), generator=generator)
    rows = torch.arange(crop)
    ys = (top[:, None] + rows[None, :])[:, :, None].expand(total, crop, crop)
    xs = (left[:, None] + rows[None, :])[:, None, :].expand(total, crop, crop)
    crops = images[order[:, None, None], channel[:, None, None], ys, xs].unsqueeze(1)
    if mean is not None:
        m = torch.tensor(mean, dtype=torch.float32)[channel].view(-1, 1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32)[channel].view(-1, 1, 1, 1)
        crops = (crops.to(torch.float32) / 255.0 - m) / s
    return list(crops.split(batch_size))
