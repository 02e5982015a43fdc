"""Tests for the DARTS search (and anti-search) and for retraining, on tiny data and networks."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbutils.nas import darts as darts_mod
from nbutils.space import network as network_mod
from nbutils.training import loop as loop_mod
from nbutils.nas.darts import DartsConfig, SearchDiverged, darts_search
from nbutils.core.batches import BatchLoader
from nbutils.core.image_dataset import channel_stats
from nbutils.space.genotype import Genotype, genotype_from_alpha, published
from nbutils.space.network import EvalNetwork, count_parameters
from nbutils.space.supernet import SuperNet
from nbutils.training.loop import cutout, evaluate
from nbutils.training.train import RetrainConfig, retrain

from toys import toy, toy_supernet

CPU = torch.device("cpu")


def tiny_config(**kw) -> DartsConfig:
    base = dict(epochs=2, channels=4, layers=3, batch_size=8)
    base.update(kw)
    return DartsConfig(**base)


# --------------------------------------------------------------------------- defaults


def test_darts_config_defaults_follow_reference():
    c = DartsConfig()
    assert (c.epochs, c.channels, c.layers, c.batch_size) == (50, 16, 8, 64)
    assert (c.lr, c.lr_min, c.momentum, c.weight_decay, c.grad_clip) == (0.025, 0.001, 0.9, 3e-4, 5.0)
    assert (c.arch_lr, tuple(c.arch_betas), c.arch_weight_decay) == (3e-4, (0.5, 0.999), 1e-3)
    assert c.anti is False


def test_retrain_config_defaults_follow_pdarts():
    c = RetrainConfig()
    assert (c.epochs, c.channels, c.layers, c.batch_size) == (600, 36, 20, 128)
    assert (c.lr, c.lr_min, c.momentum, c.weight_decay, c.grad_clip) == (0.025, 0.0, 0.9, 3e-4, 5.0)
    assert (c.auxiliary, c.auxiliary_weight, c.drop_path, c.cutout) == (True, 0.4, 0.3, 16)


# --------------------------------------------------------------------------- the architecture step


@pytest.mark.parametrize("anti", [False, True])
def test_arch_gradient_is_first_order_validation_gradient(monkeypatch, anti):
    """At every architecture step, alpha's gradient is (+/-) d CE(model(x_val), y_val) / d alpha
    at the current weights, on a batch of the architecture half; only Adam moves alpha."""
    models: list[SuperNet] = []
    ce_calls: list[torch.Tensor] = []
    records: list[dict] = []
    real_ce = F.cross_entropy
    real_adam = torch.optim.Adam

    class CapturingSuperNet(SuperNet):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            models.append(self)

        def forward(self, x):
            self.last_input = x
            return super().forward(x)

    def recording_ce(logits, target, *a, **kw):
        ce_calls.append(target.clone())
        return real_ce(logits, target, *a, **kw)

    class RecordingAdam(real_adam):
        def step(self, closure=None):
            model = models[-1]
            alphas = model.arch_parameters()
            assert [id(p) for g in self.param_groups for p in g["params"]] == [id(a) for a in alphas]
            grads = [a.grad.detach().clone() for a in alphas]
            x_val, y_val = model.last_input, ce_calls[-1]
            expected = torch.autograd.grad(real_ce(model(x_val), y_val), alphas)
            out = super().step(closure)
            records.append({
                "grads": grads,
                "expected": [e.detach().clone() for e in expected],
                "y": y_val,
                "after": [a.detach().clone() for a in alphas],
            })
            return out

    monkeypatch.setattr(darts_mod, "supernet_class", lambda fast, device: CapturingSuperNet)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording_ce)
    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)

    # the weight half has labels 0/1 only, the architecture half only label 2
    weight_part = toy(16, seed=1, labels=[0, 1] * 8)
    arch_part = toy(8, seed=2, labels=[2] * 8)
    # the plain supernet (the one patched above): the executable specification
    result = darts_search(weight_part, arch_part, tiny_config(anti=anti, fast=False), seed=3, device=CPU)

    assert len(records) == 4  # 2 epochs x 2 weight batches, one architecture step each
    sign = -1.0 if anti else 1.0
    for r in records:
        assert torch.equal(r["y"], torch.full((8,), 2))  # the architecture batch
        for got, want in zip(r["grads"], r["expected"]):
            assert want.abs().max() > 0
            torch.testing.assert_close(got, sign * want, rtol=1e-4, atol=1e-9)
    # alpha at the end of each epoch is alpha after that epoch's last Adam step: the weight
    # step never moves alpha
    for epoch in range(2):
        after = records[2 * epoch + 1]["after"]
        np.testing.assert_array_equal(result.arrays["alpha_normal"][epoch], after[0].numpy())
        np.testing.assert_array_equal(result.arrays["alpha_reduce"][epoch], after[1].numpy())


def test_anti_search_negates_first_alpha_step():
    """One architecture step from the same state on the same batch: with no weight decay on alpha,
    Adam's first step is -lr * g / (|g| + eps), so anti-search's step is exactly the negative."""
    weight_part = toy(8, seed=11)
    arch_part = toy(8, seed=12)
    config = dict(epochs=1, channels=4, layers=3, batch_size=8, arch_weight_decay=0.0)
    normal = darts_search(weight_part, arch_part, DartsConfig(**config), seed=5, device=CPU)
    anti = darts_search(weight_part, arch_part, DartsConfig(**config, anti=True), seed=5, device=CPU)
    init = toy_supernet(seed=5).alphas_numpy()
    arch_lr = DartsConfig().arch_lr
    for name in ("alpha_normal", "alpha_reduce"):
        assert normal.arrays[name].shape == (1, 14, 8)
        d_normal = normal.arrays[name][0].astype(np.float64) - init[name]
        d_anti = anti.arrays[name][0].astype(np.float64) - init[name]
        np.testing.assert_allclose(d_anti, -d_normal, rtol=0, atol=1e-9)
        # Adam's first step has size ~arch_lr wherever the gradient is not tiny
        assert np.all(np.abs(d_normal) <= arch_lr * (1 + 1e-4))
        assert np.mean(np.abs(d_normal) > 0.5 * arch_lr) > 0.9


def test_anti_search_increases_validation_loss_of_its_step():
    """After anti's first architecture step the validation loss at the initial weights is higher
    than after the normal step (first-order: the steps follow -g and +g)."""
    torch.manual_seed(0)
    weight_part = toy(8, seed=21)
    arch_part = toy(8, seed=22)
    config = dict(epochs=1, channels=4, layers=3, batch_size=8, arch_weight_decay=0.0, augment=False)
    normal = darts_search(weight_part, arch_part, DartsConfig(**config), seed=7, device=CPU)
    anti = darts_search(weight_part, arch_part, DartsConfig(**config, anti=True), seed=7, device=CPU)
    torch.manual_seed(7)
    model = toy_supernet(seed=7)
    x, y = next(iter(BatchLoader(arch_part, 8, shuffle=True, seed=8)))
    losses = {}
    for name, res in (("normal", normal), ("anti", anti)):
        with torch.no_grad():
            model.alpha_normal.copy_(torch.from_numpy(res.arrays["alpha_normal"][0]))
            model.alpha_reduce.copy_(torch.from_numpy(res.arrays["alpha_reduce"][0]))
            losses[name] = F.cross_entropy(model(x), y).item()
    assert losses["anti"] > losses["normal"]


# --------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("nan_from_call, epoch", [(1, 1), (3, 2)])
def test_divergence_raises_naming_the_epoch(monkeypatch, nan_from_call, epoch):
    real_ce = F.cross_entropy
    calls = {"n": 0}

    def nan_ce(logits, target, *a, **kw):
        calls["n"] += 1
        loss = real_ce(logits, target, *a, **kw)
        return loss * float("nan") if calls["n"] >= nan_from_call else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_ce)
    # one batch per half: two cross-entropy calls per epoch (architecture, then weights)
    with pytest.raises(SearchDiverged, match=rf"epoch {epoch}\b"):
        darts_search(toy(8, seed=1), toy(8, seed=2), tiny_config(epochs=3), seed=0, device=CPU)
    assert calls["n"] == 2 * epoch
    assert issubclass(SearchDiverged, RuntimeError)


# --------------------------------------------------------------------------- end to end, determinism


def test_darts_search_end_to_end_and_deterministic():
    weight_part = toy(16, seed=31)
    arch_part = toy(16, seed=32)
    config = tiny_config(epochs=2)
    a = darts_search(weight_part, arch_part, config, seed=4, device=CPU)
    b = darts_search(weight_part, arch_part, config, seed=4, device=CPU)

    assert len(a.history) == 2
    assert [row["epoch"] for row in a.history] == [1, 2]
    for row in a.history:
        for key in ("train_loss", "val_loss", "lr"):
            assert math.isfinite(row[key]) and row[key] > 0
        for key in ("train_acc", "val_acc"):
            assert 0.0 <= row[key] <= 1.0
            assert (row[key] * 16) == pytest.approx(round(row[key] * 16))  # a fraction of 16 samples
        Genotype.from_dict(row["genotype"])
    init = toy_supernet(seed=4).alphas_numpy()
    for name in ("alpha_normal", "alpha_reduce"):
        assert a.arrays[name].shape == (2, 14, 8)
        assert np.all(np.isfinite(a.arrays[name]))
        assert not np.allclose(a.arrays[name][0], init[name], rtol=0, atol=1e-6)
        assert not np.array_equal(a.arrays[name][0], a.arrays[name][1])
    assert a.genotype == genotype_from_alpha(a.arrays["alpha_normal"][-1], a.arrays["alpha_reduce"][-1])
    assert a.genotype == Genotype.from_dict(a.history[-1]["genotype"])

    # determinism: identical genotypes, histories and alpha traces
    assert a.genotype == b.genotype
    assert a.history == b.history
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    # and the seed matters
    c = darts_search(weight_part, arch_part, config, seed=5, device=CPU)
    assert not np.array_equal(a.arrays["alpha_normal"], c.arrays["alpha_normal"])


def test_history_lr_is_the_lr_the_epoch_trained_with(monkeypatch):
    used: list[float] = []
    real_sgd = torch.optim.SGD

    class RecordingSGD(real_sgd):
        def step(self, closure=None):
            used.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    res = darts_search(toy(8, seed=81), toy(8, seed=82), tiny_config(epochs=2), seed=0, device=CPU)
    assert len(used) == 2  # one weight batch per epoch
    assert used[0] == pytest.approx(0.025)  # the schedule itself is right
    assert [row["lr"] for row in res.history] == pytest.approx(used)


def test_darts_search_uses_input_channels_and_classes():
    weight_part = toy(8, seed=41, channels=3, num_classes=5)
    arch_part = toy(8, seed=42, channels=3, num_classes=5)
    res = darts_search(weight_part, arch_part, tiny_config(epochs=1), seed=0, device=CPU)
    assert len(res.history) == 1 and math.isfinite(res.history[0]["train_loss"])
    # loss starts near log(5) for 5 classes (small init of the classifier)
    assert abs(res.history[0]["val_loss"] - math.log(5)) < 1.0


# --------------------------------------------------------------------------- cutout


def reference_cutout_mask(h: int, w: int, length: int, cy: int, cx: int) -> np.ndarray:
    """DARTS ``utils.Cutout``: zero ``[clip(y - l//2), clip(y + l//2))`` x the same for x."""
    mask = np.ones((h, w), np.float32)
    y1, y2 = np.clip(cy - length // 2, 0, h), np.clip(cy + length // 2, 0, h)
    x1, x2 = np.clip(cx - length // 2, 0, w), np.clip(cx + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0.0
    return mask


@pytest.mark.parametrize("length", [4, 3, 2])
def test_cutout_zeroes_the_reference_square(length):
    n, h, w = 64, 8, 8
    x = torch.ones(n, 2, h, w)
    out = cutout(x, length, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    cy = torch.randint(h, (n, 1, 1), generator=g).flatten().tolist()
    cx = torch.randint(w, (n, 1, 1), generator=g).flatten().tolist()
    assert torch.equal(x, torch.ones(n, 2, h, w))  # input untouched
    centres = set()
    for i in range(n):
        mask = torch.from_numpy(reference_cutout_mask(h, w, length, cy[i], cx[i]))
        for c in range(2):  # same square on every channel
            assert torch.equal(out[i, c], mask), (i, cy[i], cx[i])
        centres.add((cy[i], cx[i]))
        zeros = (out[i, 0] == 0).nonzero()
        half = length // 2
        rows = (min(cy[i] + half, h) - max(cy[i] - half, 0))
        cols = (min(cx[i] + half, w) - max(cx[i] - half, 0))
        assert len(zeros) == rows * cols
    assert len(centres) > 20  # centres really vary per image


def test_cutout_keeps_values_outside_the_square():
    x = torch.randn(4, 3, 8, 8)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    zeroed = out == 0
    assert torch.equal(out[~zeroed], x[~zeroed])
    assert bool(zeroed.any())


# --------------------------------------------------------------------------- retraining


def test_retrain_tiny():
    train_set = toy(64, seed=51)
    test_set = toy(20, seed=52)
    g = published("DARTS_V2")
    config = RetrainConfig(epochs=1, channels=4, layers=3, batch_size=16, auxiliary=True, cutout=2)
    out = retrain(g, train_set, test_set, config, seed=0, device=CPU)
    assert 0.0 <= out["test_acc"] <= 1.0
    assert out["test_acc"] * 20 == pytest.approx(round(out["test_acc"] * 20))
    assert math.isfinite(out["test_loss"]) and out["test_loss"] > 0
    assert len(out["curve"]) == 1 and out["curve"][0]["epoch"] == 1
    assert math.isfinite(out["curve"][0]["train_loss"]) and 0 <= out["curve"][0]["train_acc"] <= 1

    reference = EvalNetwork(g, channels=4, num_classes=3, layers=3, auxiliary=True, in_channels=1, input_size=8)
    expected = count_parameters(reference, exclude_auxiliary=True)
    assert out["parameters"] == expected
    assert expected < count_parameters(reference)  # the head exists and is excluded
    assert count_parameters(out["model"]) == count_parameters(reference)

    # test accuracy/loss are those of the returned model on the test set, normalised with train stats
    mean, std = channel_stats(train_set)
    acc, loss = evaluate(out["model"], BatchLoader(test_set, 7, shuffle=False, seed=0, mean=mean, std=std))
    assert acc == pytest.approx(out["test_acc"])
    assert loss == pytest.approx(out["test_loss"], rel=1e-5)


def test_retrain_applies_cutout_and_ramps_drop_path(monkeypatch):
    drop_probs, cutout_lengths = [], []
    real_drop, real_cutout = network_mod.drop_path, loop_mod.cutout

    def rec_drop(x, p):
        drop_probs.append(p)
        return real_drop(x, p)

    def rec_cutout(x, length, generator):
        cutout_lengths.append(length)
        return real_cutout(x, length, generator)

    monkeypatch.setattr(network_mod, "drop_path", rec_drop)
    monkeypatch.setattr(loop_mod, "cutout", rec_cutout)
    config = RetrainConfig(epochs=2, channels=4, layers=3, batch_size=16, auxiliary=True, cutout=2, drop_path=0.3,
                           fast=False)   # records the plain network's drop_path calls
    out = retrain(published("PDARTS"), toy(32, seed=61), toy(8, seed=62), config, seed=1, device=CPU)
    assert len(out["curve"]) == 2
    assert cutout_lengths == [2] * 4  # 2 epochs x 2 batches
    # drop probability 0.3 * epoch / epochs: 0 in epoch 1 (never called), 0.15 in epoch 2
    assert drop_probs and all(p == pytest.approx(0.15) for p in drop_probs)

    cutout_lengths.clear()
    retrain(published("PDARTS"), toy(32, seed=61), toy(8, seed=62),
            RetrainConfig(epochs=1, channels=4, layers=3, batch_size=16, cutout=0), seed=1, device=CPU)
    assert cutout_lengths == []


def test_retrain_deterministic():
    config = RetrainConfig(epochs=2, channels=4, layers=3, batch_size=16, cutout=2)
    a = retrain(published("DARTS_V1"), toy(32, seed=71), toy(8, seed=72), config, seed=3, device=CPU)
    b = retrain(published("DARTS_V1"), toy(32, seed=71), toy(8, seed=72), config, seed=3, device=CPU)
    assert a["curve"] == b["curve"]
    assert a["test_loss"] == b["test_loss"] and a["test_acc"] == b["test_acc"]


def test_retrain_channels_last_is_the_same_training():
    """channels_last changes the memory layout, not the arithmetic: the same curve and test
    loss to float32 rounding; mixed precision asked for on the CPU trains in float32, and says so."""
    config = RetrainConfig(epochs=1, channels=4, layers=3, batch_size=16, cutout=2)
    plain = retrain(published("DARTS_V2"), toy(32, seed=81), toy(8, seed=82), config, seed=4, device=CPU)
    nhwc = retrain(published("DARTS_V2"), toy(32, seed=81), toy(8, seed=82),
                   RetrainConfig(**{**config.__dict__, "channels_last": True, "mixed_precision": True}),
                   seed=4, device=CPU)
    assert nhwc["channels_last"] and not nhwc["mixed_precision"] and not plain["channels_last"]
    assert nhwc["curve"][0]["train_loss"] == pytest.approx(plain["curve"][0]["train_loss"], rel=1e-4)
    assert nhwc["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-4)
    assert nhwc["model"].stem[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_warmup_epochs_train_the_weights_only():
    """Alpha stays at its initial value through the warm-up epochs (no architecture step, no
    validation figures) and moves from the first epoch after; the weights train throughout."""
    found = darts_search(toy(20, seed=1), toy(20, seed=2), tiny_config(epochs=3, warmup_epochs=2), seed=0, device=CPU)
    start = toy_supernet().alphas_numpy()
    for epoch in (0, 1):
        assert np.array_equal(found.arrays["alpha_normal"][epoch], start["alpha_normal"])
        assert found.history[epoch]["val_acc"] is None
    assert not np.array_equal(found.arrays["alpha_normal"][2], start["alpha_normal"])
    assert found.history[2]["val_acc"] is not None
    # a search's length in steps: ceil(20 / batch) = 3 weight steps per epoch, architecture steps after the warm-up
    per_epoch = math.ceil(20 / tiny_config().batch_size)
    assert [row["weight_steps"] for row in found.history] == [per_epoch] * 3
    assert [row["arch_steps"] for row in found.history] == [0, 0, per_epoch]


def test_warmup_must_leave_an_architecture_epoch():
    with pytest.raises(ValueError, match="warmup_epochs.*less than epochs"):
        DartsConfig(epochs=3, warmup_epochs=3)


def test_retrain_on_the_fast_network_trains_the_same_network():
    """``fast`` (the default) trains the fast evaluation network: the same parameters, the same
    function up to float32 rounding, so the same curve and a state_dict the plain network loads."""
    config = RetrainConfig(epochs=2, channels=4, layers=3, batch_size=16, auxiliary=True, cutout=2, drop_path=0.2)
    train_set, test_set = toy(32, seed=71), toy(16, seed=72)
    fast = retrain(published("DARTS_V2"), train_set, test_set, config, seed=3, device=CPU)
    plain = retrain(published("DARTS_V2"), train_set, test_set, replace(config, fast=False), seed=3, device=CPU)
    assert type(fast["model"]).__name__ == "FastEvalNetwork" and type(plain["model"]) is EvalNetwork
    for f, p in zip(fast["curve"], plain["curve"]):
        assert f["train_loss"] == pytest.approx(p["train_loss"], rel=1e-4)
    assert fast["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-4)
    EvalNetwork(published("DARTS_V2"), channels=4, num_classes=3, layers=3, auxiliary=True,
                in_channels=1, input_size=8).load_state_dict(fast["model"].state_dict())
