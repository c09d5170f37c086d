"""Training tests run their tiny models on one thread: the ops are too small to gain from two, and on a
busy 2-core machine two OpenMP threads per process spin-wait each other (a run measured 13x slower)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # also keeps init_distributed from raising it again
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
