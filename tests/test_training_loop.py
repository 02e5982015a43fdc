"""The shared supervised training loop (nbutils.training.loop) and its four callers.

Known answers for the loop's parts (cosine schedule, clipping, auxiliary weight, drop-path
ramp, divergence), a reference loop written out here for the whole recipe, and, for each
caller (retraining, the surrogate, RoBoT's brief training, the one-shot supernet), its
results compared bitwise with a reference implementation of the loop it had before.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbutils.core.batches import BatchLoader
from nbutils.core.config import key_settings
from nbutils.core.image_dataset import channel_stats
from nbutils.nas.one_shot import OneShotSupernet, train_one_shot
from nbutils.nas.registry import SECTIONS
from nbutils.nas.robot import RobotConfig, train_candidate
from nbutils.space.genotype import published, random_genotype
from nbutils.space.network import EvalNetwork
from nbutils.training.loop import cutout, evaluate, train_supervised
from nbutils.training.recipe import SgdSettings, TrainingRecipe
from nbutils.training.surrogate import resnet18_small, train_surrogate
from nbutils.training.train import RetrainConfig, retrain

from toys import toy


class TinyNet(nn.Module):
    """A linear classifier on 2 x 4 x 4 inputs, optionally with an auxiliary linear head, that
    records the drop-path probability it sees at each forward."""

    def __init__(self, auxiliary: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(32, 3)
        self.aux = nn.Linear(32, 3) if auxiliary else None
        self.drop_path_prob = 0.0
        self.seen_drop_path: list[float] = []

    def forward(self, x):
        self.seen_drop_path.append(self.drop_path_prob)
        flat = x.flatten(1)
        logits = self.body(flat)
        return (logits, self.aux(flat)) if self.aux is not None else logits


def batches(n_batches: int = 2, size: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 2, 4, 4, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n_batches)]


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_lr(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "lr"} for row in curve]


# --------------------------------------------------------------------------- known answers


def test_learning_rate_follows_the_cosine_schedule():
    recipe = TrainingRecipe(epochs=4, lr=0.1, lr_min=0.01, grad_clip=None)
    run = train_supervised(TinyNet(), batches(1), recipe, quiet=True)
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]
    assert [row["lr"] for row in run.curve] == pytest.approx(expected, rel=1e-12)
    assert [row["epoch"] for row in run.curve] == [1, 2, 3, 4]


def test_per_step_schedule_anneals_over_every_step(monkeypatch):
    """``lr_schedule="step"``: step t of T = epochs x batches trains at lr_min + (lr - lr_min)(1 + cos(pi t / T)) / 2,
    so the last step is close to lr_min; the curve's lr is each epoch's first step's."""
    epochs, n_batches, lr, lr_min = 3, 4, 0.1, 0.01
    recipe = TrainingRecipe(epochs=epochs, lr=lr, lr_min=lr_min, grad_clip=None, lr_schedule="step")
    seen: list[float] = []
    original_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    run = train_supervised(TinyNet(), batches(n_batches), recipe, quiet=True)
    total = epochs * n_batches
    expected = [lr_min + (lr - lr_min) * (1 + math.cos(math.pi * t / total)) / 2 for t in range(total)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert [row["lr"] for row in run.curve] == pytest.approx(expected[::n_batches], rel=1e-12)
    assert seen[-1] < lr_min + 0.02 * (lr - lr_min)


def test_per_epoch_schedule_is_the_default_and_keeps_retraining_keys():
    """P-DARTS' per-epoch schedule stays the default, and a retraining config that does not set
    ``lr_schedule`` keeps the stage key it had (the field enters the key only when changed)."""
    assert TrainingRecipe(epochs=1, lr=0.1).lr_schedule == "epoch"
    assert "lr_schedule" not in key_settings(RetrainConfig())
    assert key_settings(RetrainConfig(lr_schedule="step"))["lr_schedule"] == "step"


@pytest.mark.parametrize("clip", [None, 1e-3, 1e3])
def test_a_step_is_minus_lr_times_the_gradient_clipped_to_grad_clip(clip):
    net = TinyNet(seed=1)
    data = batches(1)
    x, y = data[0]
    before = [p.detach().clone() for p in net.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    recipe = TrainingRecipe(epochs=1, lr=0.5, momentum=0.0, weight_decay=0.0, grad_clip=clip)
    train_supervised(net, data, recipe, quiet=True)
    steps = [(b - p.detach()) / 0.5 for b, p in zip(before, net.parameters())]
    step_norm = torch.sqrt(sum((s ** 2).sum() for s in steps)).item()
    if clip is not None and norm > clip:
        assert step_norm == pytest.approx(clip, rel=1e-4)      # clipped to the bound
    else:
        assert step_norm == pytest.approx(norm, rel=1e-5)      # unchanged
        for s, g in zip(steps, grads):
            torch.testing.assert_close(s, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weight", [0.0, 0.4, 2.0])
def test_the_loss_adds_the_auxiliary_loss_times_its_weight(weight):
    net = TinyNet(auxiliary=True, seed=2)
    data = batches(1)
    x, y = data[0]
    with torch.no_grad():
        logits, aux = net(x)
        expected = F.cross_entropy(logits, y).item() + weight * F.cross_entropy(aux, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    run = train_supervised(net, data, TrainingRecipe(epochs=1, lr=0.1, auxiliary_weight=weight), quiet=True)
    assert run.curve[0]["train_loss"] == pytest.approx(expected, rel=1e-6)   # the loss before the one step
    assert run.curve[0]["train_acc"] == pytest.approx(accuracy)              # of the main logits
    assert (net.aux.weight.grad is not None and net.aux.weight.grad.abs().sum() > 0) == (weight > 0)


def test_drop_path_ramps_linearly_from_zero_per_epoch():
    net = TinyNet()
    train_supervised(net, batches(2), TrainingRecipe(epochs=3, lr=0.1, drop_path=0.3), quiet=True)
    assert net.seen_drop_path == pytest.approx([0.0, 0.0, 0.1, 0.1, 0.2, 0.2])
    with pytest.raises(ValueError, match="drop_path_prob"):
        train_supervised(nn.Linear(2, 2), [], TrainingRecipe(epochs=1, lr=0.1, drop_path=0.2))


def test_cutout_is_applied_to_every_batch_from_the_given_generator():
    seen = []
    net = TinyNet()
    data = batches(2)

    def forward(x):
        seen.append(x.clone())
        return net(x)

    train_supervised(net, data, TrainingRecipe(epochs=1, lr=0.1, cutout=2), forward=forward,
                     cutout_generator=torch.Generator().manual_seed(5), quiet=True)
    replay = torch.Generator().manual_seed(5)
    for (x, _), got in zip(data, seen):
        assert torch.equal(got, cutout(x, 2, replay))
    with pytest.raises(ValueError, match="cutout_generator"):
        train_supervised(net, data, TrainingRecipe(epochs=1, lr=0.1, cutout=2))


def test_divergence_raises_naming_the_epoch_before_the_step():
    net = TinyNet(seed=3)
    data = batches(2)
    calls = []

    def forward(x):
        calls.append(1)
        out = net(x)
        return out * float("nan") if len(calls) == 3 else out   # the first batch of epoch 2

    with pytest.raises(RuntimeError, match="my training diverged in epoch 2: loss nan"):
        train_supervised(net, data, TrainingRecipe(epochs=3, lr=0.1), forward=forward, name="my training")
    assert all(torch.isfinite(p).all() for p in net.parameters())   # the NaN batch never stepped


def test_divergence_warn_logs_once_and_trains_on(caplog):
    net = TinyNet(seed=3)
    calls = []

    def forward(x):
        calls.append(1)
        out = net(x)
        return out * float("nan") if len(calls) >= 3 else out

    with caplog.at_level(logging.WARNING, logger="nbutils.training.loop"):
        run = train_supervised(net, batches(2), TrainingRecipe(epochs=3, lr=0.1, divergence="warn"),
                               forward=forward, name="candidate", quiet=True)
    assert len(run.curve) == 3 and math.isfinite(run.curve[0]["train_loss"])
    assert all(math.isnan(row["train_loss"]) for row in run.curve[1:])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "candidate diverged in epoch 2" in warnings[0]


def test_only_the_given_parameters_are_trained_through_the_forward_hook():
    net = TinyNet(auxiliary=True)
    frozen = net.aux.weight.detach().clone()
    calls = []

    def forward(x):
        calls.append(len(x))
        return net(x)[0]

    train_supervised(net, batches(2), TrainingRecipe(epochs=2, lr=0.1), parameters=net.body.parameters(),
                     forward=forward, quiet=True)
    assert calls == [6, 6, 6, 6]   # once per batch
    assert torch.equal(net.aux.weight, frozen)


def test_channels_last_and_mixed_precision_on_the_cpu():
    """channels_last is the same arithmetic in another layout; mixed precision asked for on the
    CPU trains in float32 and says so."""
    def conv_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 3))

    data = batches(2)
    plain_net, nhwc_net = conv_net(), conv_net()
    plain = train_supervised(plain_net, data, TrainingRecipe(epochs=2, lr=0.1), quiet=True)
    nhwc = train_supervised(nhwc_net, data, TrainingRecipe(epochs=2, lr=0.1, channels_last=True, mixed_precision=True),
                            quiet=True)
    assert not nhwc.mixed_precision
    assert nhwc_net[0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain.curve, nhwc.curve):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)


@pytest.mark.parametrize("field, value", [("epochs", -1), ("epochs", 1.5), ("lr", 0.0), ("lr_min", -1.0),
                                          ("momentum", 1.0), ("weight_decay", -1e-4), ("grad_clip", 0.0),
                                          ("auxiliary_weight", -0.1), ("drop_path", 1.0), ("cutout", -1),
                                          ("lr", math.nan), ("divergence", "ignore")])
def test_recipe_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainingRecipe(**{"epochs": 2, "lr": 0.1, field: value})


def test_a_config_gives_the_loop_its_sgd_settings():
    config = RobotConfig(lr=0.2, lr_min=0.01, momentum=0.5, weight_decay=1e-3, grad_clip=2.0)
    assert config.recipe(3, drop_path=0.1) == TrainingRecipe(epochs=3, lr=0.2, lr_min=0.01, momentum=0.5,
                                                             weight_decay=1e-3, grad_clip=2.0, drop_path=0.1)


def test_the_sgd_settings_are_declared_once():
    """Every config with SGD settings composes SgdSettings; one that declares a field again (its
    own default or key decision) keeps the shared type, so a rule changed there holds everywhere."""
    shared = {f.name: f.type for f in dataclasses.fields(SgdSettings)}
    for config in [*SECTIONS.values(), RetrainConfig]:
        fields = {f.name: f.type for f in dataclasses.fields(config)}
        if "weight_decay" in fields:
            assert issubclass(config, SgdSettings), config.__name__
            assert {name: fields[name] for name in shared} == shared, config.__name__


# --------------------------------------------------------------------------- the whole recipe, against a reference


def reference_loop(model, data, *, epochs, lr, lr_min, momentum, weight_decay, clip, aux_weight, drop_path,
                   cutout_length, generator) -> list[dict]:
    """The recipe of the loop's docstring, written out plainly, for networks giving ``(logits, aux or None)``."""
    opt = torch.optim.SGD(model.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=lr_min)
    curve = []
    for epoch in range(epochs):
        model.train()
        model.drop_path_prob = drop_path * epoch / epochs
        total, correct, n = 0.0, 0, 0
        for x, y in data:
            if cutout_length > 0:
                x = cutout(x, cutout_length, generator)
            opt.zero_grad()
            logits, aux = model(x)
            loss = F.cross_entropy(logits, y)
            if aux is not None:
                loss = loss + aux_weight * F.cross_entropy(aux, y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            total += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
        schedule.step()
        curve.append({"epoch": epoch + 1, "train_loss": total / n, "train_acc": correct / n})
    return curve


def test_the_loop_equals_the_reference_bitwise():
    data = batches(3)
    recipe = TrainingRecipe(epochs=3, lr=0.2, lr_min=0.01, momentum=0.8, weight_decay=1e-3, grad_clip=0.5,
                            auxiliary_weight=0.3, drop_path=0.2, cutout=2)
    net, ref = TinyNet(auxiliary=True, seed=4), TinyNet(auxiliary=True, seed=4)
    run = train_supervised(net, data, recipe, cutout_generator=torch.Generator().manual_seed(9), quiet=True)
    curve = reference_loop(ref, data, epochs=3, lr=0.2, lr_min=0.01, momentum=0.8, weight_decay=1e-3, clip=0.5,
                           aux_weight=0.3, drop_path=0.2, cutout_length=2, generator=torch.Generator().manual_seed(9))
    assert without_lr(run.curve) == curve
    assert states_equal(net, ref)
    assert net.seen_drop_path == ref.seen_drop_path


# --------------------------------------------------------------------------- each caller, unchanged


def test_retraining_equals_its_reference_loop_bitwise():
    """Retraining (auxiliary head, drop path, cutout, augmentation) as it was trained before the loop was shared."""
    genotype, train_set, test_set, seed = published("PDARTS"), toy(32, seed=61), toy(12, seed=62), 3
    config = RetrainConfig(epochs=2, channels=4, layers=3, batch_size=16, cutout=2, drop_path=0.3, fast=False)
    out = retrain(genotype, train_set, test_set, config, seed=seed, device=torch.device("cpu"))

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = EvalNetwork(genotype, channels=4, num_classes=3, layers=3, auxiliary=True, in_channels=1, input_size=8)
    mean, std = channel_stats(train_set)
    loader = BatchLoader(train_set, 16, shuffle=True, seed=seed, augment=True, mean=mean, std=std)
    curve = reference_loop(model, loader, epochs=2, lr=config.lr, lr_min=0.0, momentum=0.9, weight_decay=3e-4,
                           clip=5.0, aux_weight=0.4, drop_path=0.3, cutout_length=2, generator=generator)
    acc, loss = evaluate(model, BatchLoader(test_set, 256, shuffle=False, seed=seed, mean=mean, std=std))
    assert without_lr(out["curve"]) == curve
    assert states_equal(out["model"], model)
    assert (out["test_acc"], out["test_loss"]) == (acc, loss)


def test_surrogate_training_equals_its_reference_loop_bitwise():
    """The surrogate: no clipping, weight decay 5e-4, cosine to 0, no auxiliary head."""
    data, seed = toy(12, seed=5), 3
    trained = train_surrogate(data, epochs=2, batch_size=6, lr=0.05, seed=seed, device="cpu")

    torch.manual_seed(seed)
    model = resnet18_small(3, 1)
    mean, std = channel_stats(data)
    loader = BatchLoader(data, 6, shuffle=True, seed=seed, augment=True, mean=mean, std=std)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2)
    for _ in range(2):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        schedule.step()
    assert not trained.training
    assert states_equal(trained, model)


def test_robot_brief_training_equals_its_reference_loop_bitwise():
    """RoBoT's candidate: no auxiliary head, drop path ramp, clipping, cosine to lr_min, no augmentation."""
    config = RobotConfig(pool_size=2, init_points=1, iterations=0, budget=1, train_epochs=2, train_batch_size=16,
                         channels=4, layers=3, lr=0.1, lr_min=0.005, drop_path=0.2)
    genotype, train_set, val_set, seed = published("DARTS_V2"), toy(32, seed=7), toy(12, seed=8), 11
    mean, std = channel_stats(train_set)
    record = train_candidate(genotype, train_set, val_set, config, mean=mean, std=std, seed=seed, device="cpu")

    torch.manual_seed(seed)
    model = EvalNetwork(genotype, channels=4, num_classes=3, layers=3, auxiliary=False, in_channels=1, input_size=8)
    loader = BatchLoader(train_set, 16, shuffle=True, seed=seed, mean=mean, std=std)
    curve = reference_loop(model, loader, epochs=2, lr=0.1, lr_min=0.005, momentum=0.9, weight_decay=3e-4, clip=5.0,
                           aux_weight=0.0, drop_path=0.2, cutout_length=0, generator=None)
    val_acc, val_loss = evaluate(model, BatchLoader(val_set, 16, shuffle=False, seed=seed, mean=mean, std=std))
    assert (record["train_loss"], record["train_acc"]) == (curve[-1]["train_loss"], curve[-1]["train_acc"])
    assert (record["val_acc"], record["val_loss"]) == (val_acc, val_loss)


def test_one_shot_training_equals_its_reference_loop_bitwise():
    """The one-shot supernet: one path per batch from the seeded generator, only its weights trained."""
    data = toy(32, seed=4)
    loader = BatchLoader(data, 16, shuffle=True, seed=0, mean=(0.5,), std=(0.25,))
    torch.manual_seed(0)
    supernet = OneShotSupernet(channels=4, num_classes=3, layers=3, in_channels=1)
    torch.manual_seed(0)
    reference = OneShotSupernet(channels=4, num_classes=3, layers=3, in_channels=1)
    history = train_one_shot(supernet, loader, TrainingRecipe(epochs=2, lr=0.1, lr_min=0.001), seed=1)

    rng = np.random.default_rng(1)
    reference_loader = BatchLoader(data, 16, shuffle=True, seed=0, mean=(0.5,), std=(0.25,))
    weights = list(reference.weights())
    opt = torch.optim.SGD(weights, 0.1, momentum=0.9, weight_decay=3e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2, eta_min=0.001)
    curve = []
    for epoch in range(2):
        reference.train()
        lr, total, correct, n = opt.param_groups[0]["lr"], 0.0, 0, 0
        for x, y in reference_loader:
            genotype = random_genotype(rng)
            opt.zero_grad()
            logits = reference(x, genotype)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            nn.utils.clip_grad_norm_(weights, 5.0)
            opt.step()
            total += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
        schedule.step()
        curve.append({"epoch": epoch + 1, "lr": lr, "train_loss": total / n, "train_acc": correct / n})
    assert history == curve
    assert states_equal(supernet, reference)
