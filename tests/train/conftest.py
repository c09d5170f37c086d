"""Training tests run their tiny models on one thread: the ops are too small to gain from two, and on a
busy 2-core machine two OpenMP threads per process spin-wait each other (a run measured 13x slower).
The sharded-loading tests share `two_ranks`."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # also keeps init_distributed from raising it again
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory):
    """(folder, each rank's results) of a sharded-loading test module: its write_checkpoints(folder), then
    dist_worker.py's sharded mode on 2 gloo processes over its layouts (test_sharded_load.py and the families')."""
    from dist_worker import run_sharded

    module = request.module.__name__
    out = tmp_path_factory.mktemp(module)
    request.module.write_checkpoints(out)
    return out, run_sharded(out, module)
