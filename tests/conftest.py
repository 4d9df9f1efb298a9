"""Shared by every test: tiny tensors run on one intra-op thread.

Two threads on small tensors cost far more in synchronization than they save,
and on a busy CPU they can slow a test twentyfold.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
