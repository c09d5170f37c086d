"""Faults of a multi-process run, injected into 2 gloo processes under torchrun (fault_worker.py): a rank
that stalls makes the others stop after parallel.timeout_s with a message naming the op and the rank, not
hang; a rank that is SIGKILLed mid-run makes torchrun --max-restarts restart the group, which resumes from
the newest complete checkpoint and ends as the uninterrupted run does."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _torchrun(out: Path, mode: str, *flags: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1]), **env}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *flags,
         str(HERE / "fault_worker.py"), str(out), mode],
        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_stalled_rank_stops_the_run_with_the_op_and_the_rank(tmp_path):
    # Rank 1 sleeps 300 s before step 2; the timeout is 5 s. Without parallel.timeout_s reaching the
    # process group (30 min) the run would hang past subprocess' limit; with gloo's bare error the message
    # would name neither the op nor the rank.
    start = time.monotonic()
    proc = _torchrun(tmp_path, "stall", timeout=200, STALL_S="300")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    # Rank 0 gives up 5 s after entering step 2's all-reduce; torchrun then stops rank 1 (SIGTERM, which
    # the loop only notes, then SIGKILL after its 30 s grace).
    assert elapsed < 120, elapsed
    err = proc.stderr
    assert "CollectiveTimeout" in err, err[-3000:]
    message = next(line for line in err.splitlines() if "CollectiveTimeout:" in line)
    assert "all_reduce_sum in Trainer.train_step" in message and "step 2" in message, message
    assert "timed out after 5 s on rank 0 of 2" in message, message
    # Rank 1 entered step 1's two all-reduces and nothing since: its record says where it was last seen.
    assert "did not arrive: rank 1 (last seen in collective #" in message, message
    assert "rank 0 (" not in message.split("did not arrive:")[1], message


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.mark.slow
def test_a_killed_rank_restarts_the_group_from_the_newest_checkpoint(tmp_path):
    reference = _torchrun(tmp_path / "reference", "die")
    assert reference.returncode == 0, reference.stderr[-3000:]
    # Rank 1 is SIGKILLed when step 3 begins, on the first attempt; checkpoints at steps 2 and 4.
    faulty = _torchrun(tmp_path / "faulty", "die", "--max-restarts=1", KILL_AT="3")
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in faulty.stderr, faulty.stderr[-3000:]  # it was SIGKILLed
    assert not (tmp_path / "faulty" / "results_0.pt").exists()  # the first attempt did not finish
    full, resumed = _load(tmp_path / "reference" / "results_0.pt"), _load(tmp_path / "faulty" / "results_1.pt")
    assert Path(resumed["resumed_from"]).name == "step_00000002"
    assert list(resumed["losses"]) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], rel=1e-6, abs=1e-6), step
        assert resumed["grad_norms"][step] == pytest.approx(full["grad_norms"][step], rel=1e-6), step
    assert full["params"].keys() == resumed["params"].keys()
    for key, value in full["params"].items():
        torch.testing.assert_close(resumed["params"][key], value, rtol=1e-6, atol=1e-6, msg=key)
    checkpoints = sorted(p.name for p in (tmp_path / "faulty" / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002", "step_00000004"], checkpoints


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan"])
def test_timeout_must_be_a_positive_finite_number_of_seconds(value):
    from fastllava.config import load_config

    with pytest.raises(ValueError, match="parallel.timeout_s must be a finite number of seconds > 0"):
        load_config(None, [f"parallel.timeout_s={value}"])


def test_restarts_across_nodes_need_their_own_store_per_attempt(monkeypatch):
    # torchrun's shared store outlives an attempt and only the failed node's agent counts the restart: a
    # several-node run with restarts must say how to get a fresh store per attempt, before any work.
    from fastllava.train.distributed import _restart_store

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        _restart_store(None)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restarts: torchrun's store as it is
    assert _restart_store(None) is None
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    assert _restart_store(None) is None
