"""P-DARTS: the stage rules on hand-made probabilities, and a tiny search end to end."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nbutils.nas import pdarts as pdarts_mod
from nbutils.space.genotype import Genotype
from nbutils.space.ops import PRIMITIVES
from nbutils.nas.pdarts import PdartsConfig, final_cell, pdarts_genotype, pdarts_search, skip_dropout_rate, switch_off
from nbutils.space.supernet import SuperNet

from toys import toy

CPU = torch.device("cpu")
# the plain supernet: these tests record its modules (the fast one is tested equal to it elsewhere)
TINY = dict(layers=(3, 4, 5), epochs=2, warmup_epochs=1, channels=4, batch_size=8, fast=False)


# --------------------------------------------------------------------------- configuration


def test_config_defaults_follow_reference():
    c = PdartsConfig()
    assert c.layers == (5, 11, 17) and c.num_to_keep == (5, 3, 1)
    assert c.dropout_rates == (0.1, 0.4, 0.7)   # the reference README's, not its code default 0.0
    assert (c.epochs, c.warmup_epochs, c.channels, c.batch_size) == (25, 10, 16, 96)
    assert (c.lr, c.lr_min, c.momentum, c.weight_decay, c.grad_clip) == (0.025, 0.0, 0.9, 3e-4, 5.0)
    assert (c.arch_lr, tuple(c.arch_betas), c.arch_weight_decay) == (6e-4, (0.5, 0.999), 1e-3)
    assert (c.max_skip, c.order, c.augment, c.anti) == (2, 1, True, False)


@pytest.mark.parametrize("bad", [
    dict(layers=(5, 11)),                       # stage counts differ
    dict(num_to_keep=(5, 3, 2)),                # the last stage must keep one
    dict(num_to_keep=(5, 6, 1)),                # must decrease
    dict(num_to_keep=(8, 3, 1)),                # the first stage must drop something
    dict(layers=(2, 11, 17)),
    dict(warmup_epochs=26),
    dict(dropout_rates=(0.1, 0.4, 1.0)),
    dict(order=3),
    dict(max_skip=-1),
])
def test_config_rejects(bad):
    with pytest.raises(ValueError):
        PdartsConfig(**bad)


# --------------------------------------------------------------------------- skip dropout schedule


def test_skip_dropout_schedule_follows_reference_formulas():
    rate, epochs, warmup = 0.4, 25, 10
    got = [skip_dropout_rate(rate, e, epochs, warmup) for e in range(epochs)]
    for e, p in enumerate(got):
        want = rate * (epochs - e - 1) / epochs if e < warmup else rate * math.exp(-(e - warmup) * 0.2)
        assert p == pytest.approx(want, rel=1e-15, abs=0)
    assert got[0] == pytest.approx(0.384) and got[9] == pytest.approx(0.24)
    assert got[10] == pytest.approx(0.4) and got[24] == pytest.approx(0.4 * math.exp(-2.8))
    assert skip_dropout_rate(0.0, 3, 25, 10) == 0.0


# --------------------------------------------------------------------------- switching operations off


def test_switch_off_drops_the_lowest():
    row = np.array([0.30, 0.05, 0.10, 0.15, 0.12, 0.08, 0.10, 0.10])   # over PRIMITIVES
    # intermediate stage: the three lowest go (ties: the lower index first); `none` is like any other
    assert switch_off([row], [PRIMITIVES], 5, none_first=False) == [
        ("none", "skip_connect", "sep_conv_3x3", "dil_conv_3x3", "dil_conv_5x5")]
    low_none = row.copy()
    low_none[0], low_none[3] = 0.01, 0.44
    assert switch_off([low_none], [PRIMITIVES], 5, none_first=False) == [
        ("avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3", "dil_conv_5x5")]


def test_switch_off_in_the_last_stage_drops_none_first():
    ops = ("none", "skip_connect", "sep_conv_3x3")
    row = np.array([0.5, 0.3, 0.2])
    assert switch_off([row], [ops], 1, none_first=True) == [("skip_connect",)]   # none counts as one of the two
    assert switch_off([row], [ops], 1, none_first=False) == [("none",)]
    assert switch_off([np.array([0.2, 0.5, 0.3])], [("skip_connect", "sep_conv_3x3", "dil_conv_3x3")], 1,
                      none_first=True) == [("sep_conv_3x3",)]


# --------------------------------------------------------------------------- the final cell

OPS3 = ("max_pool_3x3", "skip_connect", "sep_conv_3x3")
# rows over OPS3; four kept edges choose a skip: e0 (0.6), e1 (0.5), e2 (0.7), e5 (0.55)
SKIPPY = np.array([
    [0.10, 0.60, 0.30],   # e0 node 2 <- 0   skip
    [0.20, 0.50, 0.30],   # e1 node 2 <- 1   skip, weakest
    [0.10, 0.70, 0.20],   # e2 node 3 <- 0   skip, strongest
    [0.20, 0.20, 0.60],   # e3 node 3 <- 1   sep
    [0.50, 0.10, 0.40],   # e4 node 3 <- 2   pool (third edge of node 3: dropped)
    [0.15, 0.55, 0.30],   # e5 node 4 <- 0   skip, second weakest
    [0.30, 0.10, 0.60],   # e6 node 4 <- 1   sep
    [0.40, 0.10, 0.50],   # e7 node 4 <- 2   sep (third of node 4)
    [0.44, 0.10, 0.46],   # e8 node 4 <- 3   sep
    [0.20, 0.10, 0.70],   # e9 node 5 <- 0   sep
    [0.60, 0.10, 0.30],   # e10 node 5 <- 1  pool
    [0.30, 0.20, 0.50],   # e11
    [0.30, 0.30, 0.40],   # e12
    [0.34, 0.30, 0.36],   # e13
])


def test_final_cell_without_limit():
    gene = final_cell(SKIPPY, [OPS3] * 14, max_skip=None)
    assert gene == (("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
                    ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("max_pool_3x3", 1))


def test_skip_limit_removes_the_weakest_skips_first():
    switches = [OPS3] * 14
    gene = final_cell(SKIPPY, switches, max_skip=2)
    # e1 (0.5) goes first and takes its next best op; then e5 (0.55): its edge now has strength
    # 0.30 and node 4 keeps e6 and e7 instead; e0 and e2 (the strongest skips) stay
    assert gene == (("skip_connect", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
                    ("sep_conv_3x3", 1), ("sep_conv_3x3", 2), ("sep_conv_3x3", 0), ("max_pool_3x3", 1))
    assert sum(op == "skip_connect" for op, _ in gene) == 2
    # one step at a time: a limit of 3 replaces only the weakest
    gene3 = final_cell(SKIPPY, switches, max_skip=3)
    assert gene3[1] == ("sep_conv_3x3", 1) and gene3[4] == ("skip_connect", 0)
    assert sum(op == "skip_connect" for op, _ in gene3) == 3
    # a limit of 0 removes them all; the input is never modified
    before = SKIPPY.copy()
    assert all(op != "skip_connect" for op, _ in final_cell(SKIPPY, switches, max_skip=0))
    np.testing.assert_array_equal(SKIPPY, before)


def test_final_cell_ignores_none_and_breaks_edge_ties_like_the_reference():
    ops = ("none", "max_pool_3x3", "sep_conv_3x3")
    probs = np.full((14, 3), 1 / 3)
    probs[0:2] = [[0.1, 0.2, 0.7], [0.1, 0.6, 0.3]]
    probs[2:5] = [[0.9, 0.05, 0.05],            # none-dominated: strength 0.05 once none is zeroed
                  [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]]
    probs[5:9] = [[0.2, 0.3, 0.5], [0.1, 0.4, 0.5],   # tie at 0.5: the later edge (e6) wins
                  [0.6, 0.2, 0.2], [0.1, 0.2, 0.7]]
    probs[9:14] = [[0.0, 0.1, 0.9], [0.0, 0.8, 0.2], [0.0, 0.5, 0.5], [0.0, 0.6, 0.4], [0.0, 0.3, 0.7]]
    gene = final_cell(probs, [ops] * 14, max_skip=2)
    assert gene == (("sep_conv_3x3", 0), ("max_pool_3x3", 1),
                    ("sep_conv_3x3", 1), ("max_pool_3x3", 2),
                    ("sep_conv_3x3", 1), ("sep_conv_3x3", 3),
                    ("sep_conv_3x3", 0), ("max_pool_3x3", 1))


def test_skip_limit_applies_to_the_normal_cell_only():
    g = pdarts_genotype({"normal": SKIPPY, "reduce": SKIPPY}, {"normal": [OPS3] * 14, "reduce": [OPS3] * 14})
    assert g.counts("normal")["skip"] == 2 and g.counts("reduce")["skip"] == 4


# --------------------------------------------------------------------------- end to end


class _Recorder:
    """A SuperNet subclass that records each stage's network and the dropout rates it was given."""

    def __init__(self):
        self.models: list[SuperNet] = []
        self.dropout: list[tuple[int, float]] = []
        rec = self

        class RecordingSuperNet(SuperNet):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                rec.models.append(self)
                self.initial = {k: v.clone() for k, v in self.state_dict().items()}

            def set_skip_dropout(self, p):
                super().set_skip_dropout(p)
                rec.dropout.append((len(rec.models), p))

        self.cls = RecordingSuperNet


@pytest.fixture(scope="module")
def tiny_run():
    recorder = _Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pdarts_mod, "supernet_class", lambda fast, device: recorder.cls)
        result = pdarts_search(toy(16, seed=1), toy(16, seed=2), PdartsConfig(**TINY), seed=3, device=CPU)
    return result, recorder


def test_tiny_search_is_deterministic(tiny_run):
    a, _ = tiny_run
    b = pdarts_search(toy(16, seed=1), toy(16, seed=2), PdartsConfig(**TINY), seed=3, device=CPU)
    assert a.genotype == b.genotype and a.history == b.history and a.stages == b.stages
    assert a.arrays.keys() == b.arrays.keys()
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    c = pdarts_search(toy(16, seed=1), toy(16, seed=2), PdartsConfig(**{**TINY, "epochs": 1, "warmup_epochs": 0}),
                      seed=4, device=CPU)
    assert not np.array_equal(c.arrays["alpha_normal_stage1"][0], a.arrays["alpha_normal_stage1"][0])


def test_stage_transitions_switch_operations_off(tiny_run):
    result, _ = tiny_run
    assert [s["stage"] for s in result.stages] == [1, 2, 3] and [s["cells"] for s in result.stages] == [3, 4, 5]
    widths = [(len(s["switches_normal"][0]), len(s["kept_normal"][0])) for s in result.stages]
    assert widths == [(8, 5), (5, 3), (3, 1)]
    assert all(tuple(e) == PRIMITIVES for e in result.stages[0]["switches_normal"])
    for before, after in zip(result.stages, result.stages[1:]):
        for cell in ("normal", "reduce"):
            assert after[f"switches_{cell}"] == before[f"kept_{cell}"]   # only the switches carry over
    for stage in result.stages:
        last = stage["stage"] == 3
        for cell in ("normal", "reduce"):
            for ops, kept, probs in zip(stage[f"switches_{cell}"], stage[f"kept_{cell}"], stage[f"probs_{cell}"]):
                assert len(ops) == len(probs) and sum(probs) == pytest.approx(1.0)
                assert set(kept) <= set(ops) and [o for o in ops if o in kept] == kept   # order kept
                ranked = [o for o in ops if not (last and o == "none")]
                weight = dict(zip(ops, probs))
                # the kept are the strongest (of the non-none ones in the last stage)
                assert min(weight[o] for o in kept) >= max((weight[o] for o in ranked if o not in kept), default=0)
                if last:
                    assert kept != ["none"]
    for cell in ("normal", "reduce"):
        assert np.asarray(result.stages[0][f"probs_{cell}"]).shape == (14, 8)
    assert {k: v.shape for k, v in result.arrays.items()} == {
        "alpha_normal_stage1": (2, 14, 8), "alpha_reduce_stage1": (2, 14, 8),
        "alpha_normal_stage2": (2, 14, 5), "alpha_reduce_stage2": (2, 14, 5),
        "alpha_normal_stage3": (2, 14, 3), "alpha_reduce_stage3": (2, 14, 3),
    }


def test_weights_are_rebuilt_per_stage(tiny_run):
    result, recorder = tiny_run
    models = recorder.models
    assert len(models) == 3 and len({id(m) for m in models}) == 3
    assert [m.layers for m in models] == [3, 4, 5]
    for model, stage in zip(models, result.stages):
        assert [list(e) for e in model.switches_normal] == stage["switches_normal"]
        assert [list(e) for e in model.switches_reduce] == stage["switches_reduce"]
        fresh = SuperNet(channels=4, num_classes=3, layers=stage["cells"], in_channels=1,
                         switches_normal=stage["switches_normal"], switches_reduce=stage["switches_reduce"])
        count = sum(p.numel() for p in fresh.weights())
        assert stage["parameters"] == count == sum(p.numel() for p in model.weights())
    # the stem has the same shape in every stage, yet each stage starts from a fresh initialisation
    for before, after in zip(models, models[1:]):
        assert after.initial["stem.0.weight"].shape == before.stem[0].weight.shape
        assert not torch.equal(after.initial["stem.0.weight"], before.stem[0].weight.detach())
        assert not torch.equal(after.initial["stem.0.weight"], before.initial["stem.0.weight"])


def test_warmup_epochs_train_weights_only_and_dropout_follows_schedule(tiny_run):
    result, recorder = tiny_run
    rates = PdartsConfig(**TINY).dropout_rates
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5, 6]
    assert [(r["stage"], r["stage_epoch"], r["arch_step"]) for r in result.history] == [
        (1, 1, False), (1, 2, True), (2, 1, False), (2, 2, True), (3, 1, False), (3, 2, True)]
    expected = [(s + 1, skip_dropout_rate(rates[s], e, 2, 1)) for s in range(3) for e in range(2)]
    assert recorder.dropout == expected
    assert [r["skip_dropout"] for r in result.history] == [p for _, p in expected]
    for model, rate in zip(recorder.models, rates):
        # after the last epoch: the rate of that epoch (later stages may have lost every skip)
        dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        assert all(d.p == pytest.approx(skip_dropout_rate(rate, 1, 2, 1)) for d in dropouts)
        assert dropouts or model is not recorder.models[0]
    for row in result.history:
        Genotype.from_dict(row["genotype"])
        assert math.isfinite(row["train_loss"]) and 0 <= row["train_acc"] <= 1
        assert row["ops_per_edge"] == {1: 8, 2: 5, 3: 3}[row["stage"]]
        if row["arch_step"]:
            assert math.isfinite(row["val_loss"]) and 0 <= row["val_acc"] <= 1
        else:
            assert row["val_loss"] is None and row["val_acc"] is None
    # alpha does not move in a warm-up epoch, and does in the next one
    for stage, model in enumerate(recorder.models, 1):
        trace = result.arrays[f"alpha_normal_stage{stage}"]
        np.testing.assert_array_equal(trace[0], model.initial["alpha_normal"].numpy())
        assert not np.array_equal(trace[1], trace[0])


def test_final_genotype_is_valid_and_follows_the_last_stage(tiny_run):
    result, _ = tiny_run
    g = result.genotype
    assert Genotype.from_dict(g.to_dict()) == g
    assert g.counts("normal")["skip"] <= 2
    last = result.stages[-1]
    probs = {cell: np.asarray(last[f"probs_{cell}"]) for cell in ("normal", "reduce")}
    switches = {cell: [tuple(e) for e in last[f"switches_{cell}"]] for cell in ("normal", "reduce")}
    assert g == pdarts_genotype(probs, switches, max_skip=2)
    assert last["genotype"] == g.to_dict()
    unlimited = Genotype.from_dict(last["genotype_before_skip_limit"])
    assert unlimited == pdarts_genotype(probs, switches, max_skip=None)
    assert unlimited.reduce == g.reduce
    # without the limit, every kept edge carries the single operation left after the last stage
    for cell in ("normal", "reduce"):
        edges = [(node, src) for node in range(2, 6) for src in range(node)]
        for k, (op, src) in enumerate(getattr(unlimited, cell)):
            e = edges.index((2 + k // 2, src))
            assert last[f"kept_{cell}"][e] == [op]


def test_alpha_gradient_is_clipped_in_pdarts(monkeypatch):
    calls = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **kw):
        params = list(params)
        calls.append((tuple(p.shape for p in params), max_norm))
        return real_clip(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    config = PdartsConfig(layers=(3,), num_to_keep=(1,), dropout_rates=(0.0,), epochs=1, warmup_epochs=0,
                          channels=4, batch_size=8, grad_clip=3.0)
    res = pdarts_search(toy(8, seed=5), toy(8, seed=6), config, seed=0, device=CPU)
    assert calls[0] == (((14, 8), (14, 8)), 3.0)   # alpha first (architecture step), then the weights
    assert calls[1][1] == 3.0 and len(calls[1][0]) > 2 and len(calls) == 2
    assert len(res.stages) == 1 and all(len(e) == 1 for e in res.stages[0]["kept_normal"])
    assert "none" not in {op for e in res.stages[0]["kept_normal"] for op in e}
