"""Checkpoints: resumed = uninterrupted to 1e-6 (fp32, CPU); half-written checkpoints are never loaded;
a SIGTERM mid-run leaves a complete checkpoint and a clean exit."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastllava.train.checkpoint import COMPLETE, find_resume, list_complete

from train_tiny import ToyDataset, run, tiny_config, tiny_model

HERE = Path(__file__).parent


def test_resume_is_exact_and_skips_partial_checkpoints(tmp_path):
    common = ["train.max_steps=6", "data.max_tokens_per_pack=64", "optim.warmup_ratio=0.3"]
    full = run(tiny_config(tmp_path / "a", *common, "checkpoint.every_steps=3", "checkpoint.keep_last=0"),
               tiny_model(), ToyDataset(48))
    assert [p.name for _, p in list_complete(tmp_path / "a" / "checkpoints")] == ["step_00000003", "step_00000006"]

    # A fresh run directory holding the step-3 checkpoint and two broken newer ones.
    ckpts = tmp_path / "b" / "checkpoints"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000003", ckpts / "step_00000003")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000006", ckpts / "step_00000005.tmp")  # killed mid-write
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000006", ckpts / "step_00000004")
    (ckpts / "step_00000004" / COMPLETE).unlink()  # renamed but never marked complete
    assert find_resume(ckpts, "auto") == ckpts / "step_00000003"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        find_resume(ckpts, str(ckpts / "step_00000004"))

    # Trainable weights come from the checkpoint (perturbed here to prove it); frozen ones (the vision
    # tower in stage 2) are not saved and come from the model source, as in a real resume.
    model = tiny_model()
    with torch.no_grad():
        for p in list(model.language_model.parameters()) + list(model.projector.parameters()):
            p.add_(0.5)
    resumed = run(tiny_config(tmp_path / "b", *common), model, ToyDataset(48))
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6, abs=1e-6), step
        assert resumed.grad_norms[step] == pytest.approx(full.grad_norms[step], rel=1e-6), step
    assert not (ckpts / "step_00000005.tmp").exists()  # partial writes are cleaned up at start


def test_resume_refuses_a_changed_plan(tmp_path):
    run(tiny_config(tmp_path, "train.max_steps=1", "checkpoint.every_steps=1"), tiny_model(), ToyDataset(16))
    with pytest.raises(ValueError, match="global_batch"):
        run(tiny_config(tmp_path, "train.max_steps=2", "train.global_batch_size=4"), tiny_model(), ToyDataset(16))


_SCRIPT = """
import sys
sys.path.insert(0, {here!r})
from train_tiny import ToyDataset, run, tiny_config, tiny_model
cfg = tiny_config({out!r}, "train.max_steps=400", "train.global_batch_size=4", "logging.progress=true")
r = run(cfg, tiny_model(), ToyDataset(2000))
print("interrupted", r.interrupted, r.checkpoint, flush=True)
"""


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    # A progress line per step (stdout is a pipe, not a terminal): the test waits for step 2 in the log.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1]), "FASTLLAVA_PROGRESS_INTERVAL": "0"}
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT.format(here=str(HERE), out=str(out))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("train:") and " 2/400 " in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert proc.returncode == 0, text
    assert "stop signal: saved" in text and "interrupted True" in text, text
    done = list_complete(out / "checkpoints")
    assert len(done) == 1 and 2 <= done[0][0] < 400, text
    names = {p.name for p in done[0][1].iterdir()}
    assert {COMPLETE, "trainer_state.json", "rng_rank0.json", "optimizer.json"} <= names
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
