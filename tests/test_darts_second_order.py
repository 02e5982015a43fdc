"""Second-order (unrolled) DARTS: the architecture gradient against an exact autograd
computation, side effects of the architecture step, and the search end to end."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from nbutils.nas import darts as darts_mod
from nbutils.nas.darts import (
    DartsConfig,
    StepRule,
    architecture_step,
    darts_search,
    first_order_alpha_grad,
    make_optimisers,
    weight_step,
)
from nbutils.nas.darts_unrolled import unrolled_alpha_grad
from nbutils.space.genotype import Genotype
from nbutils.space.supernet import SuperNet

from toys import toy, toy_supernet

CPU = torch.device("cpu")
ETA, MOMENTUM, WD = 0.025, 0.9, 3e-4


def tiny_supernet(dtype=torch.float32) -> SuperNet:
    torch.manual_seed(0)
    return toy_supernet().to(dtype)


def batches(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=g).to(dtype)
    x_val = torch.randn(4, 1, 8, 8, generator=g).to(dtype)
    return (x, torch.tensor([0, 1, 2, 0])), (x_val, torch.tensor([1, 2, 0, 1]))


def exact_unrolled_grad(model: SuperNet, train_batch, val_batch, buffers) -> tuple[list, list]:
    """d/dalpha L_val(w - eta * (momentum * buffer + g(w, alpha) + wd * w), alpha) by double
    backpropagation through the unrolled step, and the direct part alone (w' held fixed)."""
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("alpha")]
    names, weights = [n for n, _ in named], [p for _, p in named]
    alphas = [model.alpha_normal, model.alpha_reduce]
    state_buffers = dict(model.named_buffers())

    def loss(values, batch):
        state = {"alpha_normal": alphas[0], "alpha_reduce": alphas[1], **dict(zip(names, values)),
                 **{n: b.clone() for n, b in state_buffers.items()}}
        return F.cross_entropy(functional_call(model, state, (batch[0],)), batch[1])

    grads = torch.autograd.grad(loss(weights, train_batch), weights, create_graph=True)
    unrolled = [w - ETA * (MOMENTUM * buf + g + WD * w) for w, g, buf in zip(weights, grads, buffers)]
    total = torch.autograd.grad(loss(unrolled, val_batch), alphas)
    direct = torch.autograd.grad(loss([u.detach() for u in unrolled], val_batch), alphas)
    return list(total), list(direct)


def activation_patterns(model: nn.Module, run) -> list[list[torch.Tensor]]:
    """Per forward pass during ``run()``: the sign of every ReLU input and the winner of every
    max-pool window, i.e. which smooth piece of the network the pass evaluates."""
    calls: list[torch.Tensor] = []

    def relu_hook(module, inputs, output):
        calls.append(inputs[0] > 0)

    def pool_hook(module, inputs, output):
        _, idx = F.max_pool2d(inputs[0], module.kernel_size, module.stride, module.padding, return_indices=True)
        calls.append(idx)

    per_forward = sum(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in model.modules())
    handles = [m.register_forward_hook(relu_hook if isinstance(m, nn.ReLU) else pool_hook)
               for m in model.modules() if isinstance(m, (nn.ReLU, nn.MaxPool2d))]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    assert len(calls) % per_forward == 0
    return [calls[i : i + per_forward] for i in range(0, len(calls), per_forward)]


# --------------------------------------------------------------------------- the gradient


@pytest.mark.parametrize("with_momentum", [False, True])
def test_unrolled_gradient_equals_exact_autograd(with_momentum):
    """The finite-difference second-order gradient equals the exact gradient through the unrolled
    step (float64).

    Tolerance: the central difference has error O(R^2 ||v||^2 |L'''|) on a piece where the
    network is smooth, plus rounding ~1e-16 |grad| / (R ||v||) = 1e-16 / r in relative terms. The
    network is only piecewise smooth (ReLU, max pool): at this toy size the reference's r = 0.01
    moves the weights across many activation-pattern boundaries (the difference is then a secant
    over several pieces, O(1) off the derivative), so the check uses r = 1e-6 and asserts that the
    activation pattern is identical at w - Rv, w and w + Rv. Measured agreement ~5e-10;
    asserted 1e-6 on the whole gradient and 1e-5 on the implicit (second-order) part alone.
    """
    model = tiny_supernet(torch.float64)
    train_batch, val_batch = batches(torch.float64)
    weights = list(model.weights())
    g = torch.Generator().manual_seed(2)
    buffers = [0.01 * torch.randn(p.shape, generator=g, dtype=torch.float64) if with_momentum
               else torch.zeros_like(p) for p in weights]
    expected, direct = exact_unrolled_grad(model, train_batch, val_batch, buffers)

    result = {}

    def run():
        result["grads"] = unrolled_alpha_grad(
            model, train_batch, val_batch, eta=ETA, momentum=MOMENTUM, weight_decay=WD,
            momentum_buffers=buffers if with_momentum else None, r=1e-6,
        )[0]

    train_w, val_w_unrolled, train_w_plus, train_w_minus = activation_patterns(model, run)
    for a, b, c in zip(train_w, train_w_plus, train_w_minus):
        assert torch.equal(a, b) and torch.equal(a, c)
    got = result["grads"]
    for got_a, want_a, direct_a in zip(got, expected, direct):
        implicit_want = want_a - direct_a
        assert implicit_want.norm() > 0.1 * want_a.norm()   # the second-order term matters here
        assert float((got_a - want_a).norm() / want_a.norm()) < 1e-6
        assert float(((got_a - direct_a) - implicit_want).norm() / implicit_want.norm()) < 1e-5


def test_unrolled_gradient_with_zero_step_is_first_order():
    """eta = 0: w' = w and no implicit term, so the first-order gradient comes out."""
    model = tiny_supernet(torch.float64)
    train_batch, val_batch = batches(torch.float64)
    got, loss, logits = unrolled_alpha_grad(model, train_batch, val_batch, eta=0.0, momentum=MOMENTUM,
                                            weight_decay=WD)
    want, want_loss, want_logits = first_order_alpha_grad(model, val_batch)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(logits, want_logits, rtol=1e-12, atol=1e-15)


def test_reference_radius_is_the_default():
    import inspect

    assert inspect.signature(unrolled_alpha_grad).parameters["r"].default == 0.01


# --------------------------------------------------------------------------- side effects


def test_second_order_step_leaves_weights_bn_statistics_and_sgd_state_alone():
    model = tiny_supernet()
    train_batch, val_batch = batches()
    config = DartsConfig(epochs=1)
    w_opt, _, a_opt = make_optimisers(model, config)
    weight_step(model, w_opt, train_batch, grad_clip=5.0)   # so that momentum buffers exist
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers_before = [w_opt.state[p]["momentum_buffer"].clone() for p in model.weights()]
    assert any(n.endswith("running_mean") for n in before)

    loss_val, logits_val = architecture_step(model, a_opt, w_opt, train_batch, val_batch, StepRule(order=2))

    after = model.state_dict()
    for name, value in before.items():
        if name.startswith("alpha"):
            assert not torch.equal(after[name], value), name   # Adam moved alpha
        else:
            assert torch.equal(after[name], value), name        # weights and BN statistics did not move
    for p, buf in zip(model.weights(), buffers_before):
        assert torch.equal(w_opt.state[p]["momentum_buffer"], buf)
    assert math.isfinite(loss_val.item()) and logits_val.shape == (4, 3)
    # the check has teeth: an ordinary training-mode forward does move the statistics
    model(train_batch[0])
    assert any(not torch.equal(model.state_dict()[n], before[n]) for n in before if n.endswith("running_mean"))


def test_search_passes_current_lr_momentum_buffers_and_weight_decay(monkeypatch):
    sgds: list[torch.optim.SGD] = []
    calls: list[dict] = []
    real_sgd, real_unrolled = torch.optim.SGD, darts_mod.unrolled_alpha_grad

    class RecordingSGD(real_sgd):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            sgds.append(self)

    def recording_unrolled(model, train_batch, val_batch, **kw):
        opt = sgds[-1]
        expected_buffers = [opt.state.get(p, {}).get("momentum_buffer") for p in model.weights()]
        calls.append({"kw": kw, "lr": opt.param_groups[0]["lr"], "expected": expected_buffers})
        return real_unrolled(model, train_batch, val_batch, **kw)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    monkeypatch.setattr(darts_mod, "unrolled_alpha_grad", recording_unrolled)
    config = DartsConfig(epochs=2, channels=4, layers=3, batch_size=8, order=2, weight_decay=1e-3, momentum=0.8)
    res = darts_search(toy(16, seed=1), toy(16, seed=2), config, seed=0, device=CPU)
    assert len(calls) == 4   # 2 epochs x 2 weight batches
    for i, call in enumerate(calls):
        kw = call["kw"]
        assert kw["eta"] == call["lr"] == res.history[i // 2]["lr"]
        assert (kw["momentum"], kw["weight_decay"]) == (0.8, 1e-3)
        if i == 0:
            assert all(b is None for b in kw["momentum_buffers"])   # before the first weight step
        else:
            assert all(b is e for b, e in zip(kw["momentum_buffers"], call["expected"], strict=True))
            assert all(b is not None for b in kw["momentum_buffers"])
    assert res.history[1]["lr"] < res.history[0]["lr"]


# --------------------------------------------------------------------------- end to end


def test_order_must_be_one_or_two():
    for bad in (0, 3, True, 1.5):
        with pytest.raises(ValueError, match="order"):
            DartsConfig(order=bad)


def test_second_order_search_end_to_end_and_deterministic():
    weight_part, arch_part = toy(16, seed=31), toy(16, seed=32)
    config = DartsConfig(epochs=1, channels=4, layers=3, batch_size=8, order=2)
    a = darts_search(weight_part, arch_part, config, seed=4, device=CPU)
    b = darts_search(weight_part, arch_part, config, seed=4, device=CPU)
    first = darts_search(weight_part, arch_part, DartsConfig(epochs=1, channels=4, layers=3, batch_size=8),
                         seed=4, device=CPU)

    assert len(a.history) == 1
    row = a.history[0]
    for key in ("train_loss", "val_loss"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert 0 <= row["train_acc"] <= 1 and 0 <= row["val_acc"] <= 1
    assert Genotype.from_dict(row["genotype"]) == a.genotype
    assert a.arrays["alpha_normal"].shape == (1, 14, 8)
    assert a.genotype == b.genotype and a.history == b.history
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    # a different gradient from the first-order search's
    assert not np.array_equal(a.arrays["alpha_normal"], first.arrays["alpha_normal"])


def test_anti_second_order_negates_the_gradient(monkeypatch):
    """Anti flips the sign of the final (second-order) gradient handed to Adam."""
    train_batch, val_batch = batches()
    seen = []
    for anti in (False, True):
        m = tiny_supernet()
        w_opt, _, a_opt = make_optimisers(m, DartsConfig())
        real_step = a_opt.step

        def step(*a, _m=m, _real=real_step, **kw):
            seen.append([p.grad.clone() for p in _m.arch_parameters()])
            return _real(*a, **kw)

        monkeypatch.setattr(a_opt, "step", step)
        architecture_step(m, a_opt, w_opt, train_batch, val_batch, StepRule(order=2, anti=anti))
    for g, g_anti in zip(*seen):
        assert g.abs().max() > 0
        torch.testing.assert_close(g_anti, -g, rtol=0, atol=0)
