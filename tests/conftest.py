"""Shared test set-up: one intra-op thread for the whole run.

The networks in the tests are tiny: they run fastest on one thread, and on a busy 2-core
machine more threads make OpenMP spin. (Stages run by the runner limit their own threads.)
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
