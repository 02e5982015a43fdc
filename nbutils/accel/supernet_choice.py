"""Which DARTS supernet a search, or an attack rebuilding a search's supernet, runs on.

Two classes compute the same function with the same parameters: the plain
:class:`nbutils.space.supernet.SuperNet` (the executable specification) and
:class:`nbutils.accel.fast_supernet.FastSuperNet` (its forward and backward rewritten for
speed). The fast one is tuned for, and tested against the plain one on, the CPU only
(``tests/test_fast_supernet.py``): oneDNN's kernels, the C batch-norm kernels, the
channels_last layouts. On any other device ``fast: true`` therefore runs the plain supernet,
with a one-line note saying so, until a test there shows the two agree (then add the device
to :data:`FAST_SUPERNET_DEVICES`).

The DARTS and P-DARTS searches and the crafted attacks' supernets
(:func:`nbutils.pipeline.steps.attacker_models`) all decide here.
"""
from __future__ import annotations

import logging

import torch

from ..space.supernet import SuperNet
from .fast_supernet import FastSuperNet

log = logging.getLogger(__name__)

#: Device types on which the fast supernet is tested to compute the plain one's function.
FAST_SUPERNET_DEVICES: tuple[str, ...] = ("cpu",)


def supernet_class(fast: bool, device: torch.device | str) -> type[SuperNet]:
    """``FastSuperNet`` when ``fast`` and ``device`` is one it is tested on, else ``SuperNet``
    (with a note when ``fast`` was asked for on another device)."""
    kind = torch.device(device).type
    if not fast:
        return SuperNet
    if kind not in FAST_SUPERNET_DEVICES:
        log.warning("fast: true runs the plain supernet on %s: the fast supernet is tuned and tested on the "
                    "CPU only", kind)
        return SuperNet
    return FastSuperNet
