"""Where a result was computed: recorded with each artifact, and CUDA made deterministic."""
import os
import socket

import torch

from nbutils.core import device


def test_the_environment_names_machine_threads_device_and_versions():
    where = device.environment("cpu")
    assert where["host"] == socket.gethostname() and where["device"] == "cpu" and where["gpu"] is None
    assert where["threads"] == torch.get_num_threads()
    assert where["libraries"]["torch"] == torch.__version__.split("+")[0]
    assert {"numpy", "torchvision", "scipy"} <= set(where["libraries"])


def test_cuda_runs_the_deterministic_algorithms(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, warn_only=False: calls.append((mode, warn_only)))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert device.resolve_device("auto").type == "cuda"
    assert calls == [(True, True)]
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_nothing_changes_without_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append(a))
    assert device.resolve_device("auto").type == "cpu"
    device.deterministic_cuda()
    assert calls == []
