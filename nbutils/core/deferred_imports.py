"""The two heavy dependencies that are imported on first use by a function call rather than by
``lazy_loader`` (which the other modules use to declare such imports at their top).

* torchvision takes ~2 s to import, and the CLI and every notebook import the modules that use
  it. A ``lazy_loader`` proxy of it breaks torch: ``torch.testing`` and ``torch._dynamo``
  import ``torch.distributed.tensor``, whose import then loads the proxied torchvision, which
  imports the half-initialised ``torch.distributed.tensor`` again (a circular import).
* diffusers takes ~1.5-3 s, and only denoising needs it. Its package replaces itself in
  ``sys.modules`` with a lazy module of its own, which a ``lazy_loader`` proxy does not see.
"""
from __future__ import annotations

from types import ModuleType


def torchvision() -> ModuleType:
    """The ``torchvision`` package, imported on the first call."""
    import torchvision as module

    return module


def diffusers() -> ModuleType:
    """The ``diffusers`` package, imported on the first call."""
    import diffusers as module

    return module
