"""Which supernet runs: the fast one only where asked for and tested (the CPU), the plain one
otherwise, for the DARTS and P-DARTS searches and for the crafted attacks' supernets."""
from __future__ import annotations

import logging

import pytest
import torch

from nbutils.accel import supernet_choice
from nbutils.accel.fast_supernet import FastSuperNet
from nbutils.accel.supernet_choice import supernet_class
from nbutils.core.store import atomic_write_json
from nbutils.nas import darts as darts_mod
from nbutils.nas import pdarts as pdarts_mod
from nbutils.nas.darts import DartsConfig, darts_search
from nbutils.nas.pdarts import PdartsConfig, pdarts_search
from nbutils.pipeline import steps
from nbutils.space.supernet import SuperNet
from toys import toy, toy_supernet

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- the decision


@pytest.mark.parametrize("device", ["cpu", CPU])
def test_fast_on_the_cpu(device, caplog):
    with caplog.at_level(logging.WARNING, logger=supernet_choice.__name__):
        assert supernet_class(True, device) is FastSuperNet
        assert supernet_class(False, device) is SuperNet
    assert not caplog.records


@pytest.mark.parametrize("device", ["cuda", torch.device("cuda", 0), "mps"])
def test_plain_elsewhere_with_a_note_when_fast_was_asked(device, caplog):
    kind = torch.device(device).type
    with caplog.at_level(logging.WARNING, logger=supernet_choice.__name__):
        assert supernet_class(False, device) is SuperNet
        assert not caplog.records   # nothing to say: the plain one was asked for
        assert supernet_class(True, device) is SuperNet
    (record,) = caplog.records
    assert record.getMessage() == (f"fast: true runs the plain supernet on {kind}: the fast supernet is tuned and "
                                   "tested on the CPU only")


def test_a_device_proven_equal_may_be_added(monkeypatch):
    monkeypatch.setattr(supernet_choice, "FAST_SUPERNET_DEVICES", ("cpu", "cuda"))
    assert supernet_class(True, "cuda") is FastSuperNet


# --------------------------------------------------------------------------- the searches ask it


def _recording(monkeypatch, module):
    calls = []

    def record(fast, device):
        chosen = supernet_class(fast, device)
        calls.append((fast, torch.device(device), chosen))
        return chosen

    monkeypatch.setattr(module, "supernet_class", record)
    return calls


@pytest.mark.parametrize("fast", [True, False])
def test_darts_search_asks_with_its_device(monkeypatch, fast):
    calls = _recording(monkeypatch, darts_mod)
    config = DartsConfig(epochs=1, channels=4, layers=3, batch_size=8, fast=fast)
    darts_search(toy(8, seed=1), toy(8, seed=2), config, seed=0, device=CPU)
    assert calls == [(fast, CPU, FastSuperNet if fast else SuperNet)]


def test_pdarts_search_asks_once_for_every_stage(monkeypatch):
    calls = _recording(monkeypatch, pdarts_mod)
    built = []
    real = pdarts_mod._stage_supernet
    monkeypatch.setattr(pdarts_mod, "_stage_supernet", lambda cls, *a: built.append(cls) or real(cls, *a))
    config = PdartsConfig(layers=(3, 4), num_to_keep=(3, 1), dropout_rates=(0.0, 0.0), epochs=1, warmup_epochs=0,
                          channels=4, batch_size=8, fast=True)
    pdarts_search(toy(8, seed=1), toy(8, seed=2), config, seed=0, device=CPU)
    assert calls == [(True, CPU, FastSuperNet)] and built == [FastSuperNet, FastSuperNet]


# --------------------------------------------------------------------------- the attacks follow the preset


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A clean search that kept its supernets after epochs 0 and 2, and its retraining."""
    root = tmp_path_factory.mktemp("clean")
    (root / "search").mkdir()
    (root / "retrain").mkdir()
    torch.save({"0": toy_supernet(seed=1).checkpoint(), "2": toy_supernet(seed=2).checkpoint()},
               root / "search" / steps.SUPERNETS_FILE)
    atomic_write_json(root / "retrain" / steps.RESULT_FILE, {"test_acc": 0.5})
    return {"search0": str(root / "search"), "retrain0": str(root / "retrain")}


def _models(spec_fields: dict, inputs: dict, name: str) -> list:
    if name == "gc":
        spec = {"attack": {"name": "gc"}, "target": {"algorithm": "darts", "kind": "alphas"}, **spec_fields}
        return [steps.attacker_models(spec, inputs)["target"]]
    spec = {"attack": {"name": "alpha"}, "ensemble": 2, **spec_fields}
    return steps.attacker_models(spec, inputs)["supernets"]


@pytest.mark.parametrize("name", ["gc", "alpha"])
@pytest.mark.parametrize("fields, expected", [({"device": "cpu"}, FastSuperNet),
                                              ({"device": "cpu", "fast": True}, FastSuperNet),
                                              ({"device": "cpu", "fast": False}, SuperNet)],
                         ids=["fast absent", "fast true", "fast false"])
def test_attack_supernets_follow_the_spec(clean_run, name, fields, expected):
    models = _models(fields, clean_run, name)
    assert models and all(type(m) is expected for m in models)
    saved = torch.load(clean_run["search0"] + "/" + steps.SUPERNETS_FILE, weights_only=True)
    last = saved["2"]["state"]
    assert all(torch.equal(v, last[k]) for k, v in models[-1].state_dict().items())


@pytest.mark.parametrize("name", ["gc", "alpha"])
def test_attack_supernets_are_plain_on_cuda(clean_run, name, monkeypatch):
    """Crafting on CUDA rebuilds the supernets plain even with fast true (built on the CPU here:
    only the device the crafting would run on is pretended)."""
    monkeypatch.setattr(steps, "resolve_device", lambda device: torch.device("cuda"))
    models = _models({"device": "cuda", "fast": True}, clean_run, name)
    assert all(type(m) is SuperNet for m in models)
