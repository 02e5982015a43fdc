"""Progress bars for every loop a person waits for: rich in JupyterLab, plain text headless.

The runner sets ``NBUTILS_HEADLESS=1`` for the notebooks it executes, so their saved
outputs hold a few plain lines rather than hundreds of redraws.
"""
from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm as auto_tqdm

T = TypeVar("T")


def headless() -> bool:
    return os.environ.get("NBUTILS_HEADLESS", "") not in ("", "0")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kwargs) -> Iterable[T]:
    if headless():
        return plain_tqdm(iterable, desc=desc, total=total, mininterval=30.0, ascii=True, **kwargs)
    return auto_tqdm(iterable, desc=desc, total=total, **kwargs)
