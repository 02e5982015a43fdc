"""nbutils.core.malloc: freed memory stays in the process, so fresh tensors do not fault pages in."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from nbutils.pipeline.cluster import WORKER_ENVIRON
from nbutils.core.malloc import MALLOC_ENV

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")

# A step's worth of large tensors (twelve of 16 MB, the largest of DARTS' search setting),
# filled and freed, several times; print the page faults per later round.
SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from nbutils.core.malloc import keep_freed_memory
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    tensors = [torch.ones(4 << 20) for _ in range(12)]
    later = torch.ones(100)
    del tensors
for _ in range(2):
    step()
before = faults()
for _ in range(5):
    step()
print((faults() - before) // 5)
"""
PAGES = 12 * (16 << 20) // 4096   # per round


def _faults(mode: str, env=None) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.split()[-1])


def test_freed_tensors_are_reused_without_page_faults():
    # with glibc's defaults, most rounds fault every page in again (seen: 48,300 of 49,152,
    # and in some processes 800 or 10,600); kept, 0 or 819
    assert _faults("keep") < PAGES / 20


def test_the_environment_variables_do_the_same():
    assert _faults("default", env={**os.environ, **MALLOC_ENV}) < PAGES / 20


def test_dask_workers_get_the_settings():
    assert {k: str(v) for k, v in WORKER_ENVIRON.items() if k.startswith("MALLOC")} == MALLOC_ENV
