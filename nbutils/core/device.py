"""Device choice, mixed precision and seeding: ``device: auto|cpu|cuda`` in every spec,
nothing calls ``.cuda()``."""
from __future__ import annotations

import logging
import os
import platform
import random
import socket
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else the CPU; asking for CUDA without one is an error.
    On CUDA, torch is switched to its deterministic algorithms (:func:`deterministic_cuda`)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but torch sees no CUDA device; use auto or cpu")
    if device == "cuda":
        deterministic_cuda()
    return torch.device(device)


def deterministic_cuda() -> None:
    """Where CUDA is present, make its results repeatable: torch's deterministic algorithms
    (an operation without one warns rather than fails), cuDNN's deterministic kernels without
    autotuning, and the cuBLAS workspace those need (read when cuBLAS starts, so this runs before
    any CUDA work: kernels call it when they start). Nothing changes on a machine without CUDA,
    whose CPU kernels are deterministic for a given thread count already."""
    if not torch.cuda.is_available():
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


#: the libraries whose versions can change a result's last digits
LIBRARIES = ("torch", "torchvision", "numpy", "scipy", "scikit-learn")


def environment(device: str = "auto") -> dict:
    """Where a result was computed, recorded with it: results are bitwise repeatable only on the
    same kind of machine with the same thread count and library versions."""
    resolved = resolve_device(device)
    versions = {}
    for library in LIBRARIES:
        try:
            versions[library] = metadata.version(library)
        except metadata.PackageNotFoundError:
            pass
    return {"host": socket.gethostname(), "platform": platform.platform(), "processor": platform.machine(),
            "python": platform.python_version(), "libraries": versions, "threads": torch.get_num_threads(),
            "device": resolved.type, "gpu": torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else None,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class MixedPrecision:
    """Autocast to ``dtype`` with gradient scaling, or (disabled) float32 where every call is a
    pass-through. :meth:`for_device` enables float16 on CUDA only."""

    enabled: bool = False
    device_type: str = "cpu"
    dtype: torch.dtype = torch.float16

    @classmethod
    def for_device(cls, asked: bool, device: torch.device, what: str) -> "MixedPrecision":
        """``mixed_precision: true`` on ``device``; elsewhere than CUDA, a warning and float32
        (``what``: the work, for the message, e.g. "training")."""
        enabled = asked and device.type == "cuda"
        if asked and not enabled:
            log.warning("mixed_precision applies on CUDA only; %s in float32 on %s", what, device)
        return cls(enabled, device.type)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def scaler(self) -> torch.amp.GradScaler:
        """A fresh gradient scaler (one per set of parameters whose gradients share a scale)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.enabled)
