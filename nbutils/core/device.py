"""Device choice, mixed precision and seeding: ``device: auto|cpu|cuda`` in every spec,
nothing calls ``.cuda()``."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else the CPU; asking for CUDA without one is an error."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but torch sees no CUDA device; use auto or cpu")
    return torch.device(device)


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
