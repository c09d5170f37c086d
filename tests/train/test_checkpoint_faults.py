"""A checkpoint write that fails midway (a full disk): the error names the file, the checkpoint's size and
the free space; the previous complete checkpoint stays and a resume from it equals the uninterrupted run;
checkpoint.on_write_error=continue trains on; under 2 ranks a failure on one raises on both, no hang.

The fault is a disk that fills up: writes into the chosen checkpoint's files succeed for a byte budget,
the write that crosses it stores what fits and raises ENOSPC, as write(2) does. It sits under `open`
itself, so it hits DCP's tensor files and the JSON files alike, without knowing how either is written.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist

from fastllava.model import safetensors_io
from fastllava.train.checkpoint import Checkpointer, CheckpointWriteError, find_resume, list_complete
from fastllava.train.distributed import init_distributed
from fastllava.train.export import ExportWriteError

from test_checkpoint_format import assert_same, build, snapshot, train_step
from train_tiny import ToyDataset, run, tiny_config, tiny_model

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
COMMON = ["train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep_last=0"]


class FullDisk:
    """Files opened for writing whose path contains `where` share `budget` bytes; see the module docstring."""

    def __init__(self, where: str, budget: int):
        self.where, self.left = where, budget
        self.real_open = builtins.open

    def install(self, monkeypatch) -> None:
        # pathlib's Path.open (DCP's writer) calls io.open; json files go through builtins.open; the export's
        # safetensors files are written by safetensors' Rust code, routed here through open with the same bytes.
        monkeypatch.setattr(builtins, "open", self.open)
        monkeypatch.setattr(io, "open", self.open)
        monkeypatch.setattr(safetensors_io, "save_file", _save_file_through_open)

    def open(self, file, mode="r", *args, **kwargs):
        f = self.real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and self.where in os.fspath(file):
            return _Filling(f, self, os.fspath(file))
        return f


class _Filling:
    """A file object whose writes draw on the FullDisk's budget."""

    def __init__(self, f, disk: FullDisk, path: str):
        self._f, self._disk, self._path = f, disk, path

    def write(self, data):
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n <= self._disk.left:
            self._disk.left -= n
            return self._f.write(data)
        self._f.write(data[: self._disk.left])
        self._f.flush()
        self._disk.left = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _save_file_through_open(tensors, filename, metadata=None) -> None:
    with open(filename, "wb") as f:
        f.write(safetensors.torch.save(tensors, metadata=metadata))


def tensor_bytes(path: Path) -> int:
    """The tensor data of a checkpoint's safetensors files, read from their headers (not our formula)."""
    total = 0
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps with checkpoints at 3 and 6, no fault: the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("uninterrupted")
        return out, run(tiny_config(out, *COMMON), tiny_model(), ToyDataset(48))
    finally:
        torch.set_num_threads(before)


def test_disk_full_midway_stops_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, uninterrupted):
    ref_dir, ref = uninterrupted
    with monkeypatch.context() as m, pytest.raises(CheckpointWriteError) as err:
        FullDisk("step_00000006.tmp", budget=1000).install(m)
        run(tiny_config(tmp_path, *COMMON), tiny_model(), ToyDataset(48))
    text, ckpts = str(err.value), tmp_path / "checkpoints"
    assert "checkpoint of step 6 not written: rank 0: could not write " in text, text
    assert f"{ckpts / 'step_00000006.tmp'}{os.sep}" in text and "No space left on device (errno 28)" in text, text
    needed = tensor_bytes(ref_dir / "checkpoints" / "step_00000006")
    assert f"needs about {needed / 1e9:.2f} GB ({needed:,} bytes)" in text, (needed, text)
    assert f"{ckpts} has " in text and " free" in text, text
    assert f"{ckpts / 'step_00000003'}, is untouched" in text, text
    # Nothing partial remains; the step-3 checkpoint is what resume=auto picks, and it loads: the resumed
    # run's steps 4..6 equal the uninterrupted run's.
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000003"]
    assert find_resume(ckpts, "auto") == ckpts / "step_00000003"
    resumed = run(tiny_config(tmp_path, *COMMON), tiny_model(), ToyDataset(48))
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(ref.losses[step], rel=1e-6, abs=1e-6), step
    assert [s for s, _ in list_complete(ckpts)] == [3, 6]


def test_continue_flag_trains_on_without_the_failed_checkpoint(tmp_path, monkeypatch, capsys, uninterrupted):
    _, ref = uninterrupted
    with monkeypatch.context() as m:
        FullDisk(f"step_00000003.tmp{os.sep}rng_rank0.json", budget=10).install(m)  # after the tensors
        result = run(tiny_config(tmp_path, *COMMON, "checkpoint.on_write_error=continue"), tiny_model(),
                     ToyDataset(48))
    out = capsys.readouterr().out
    assert "warning: checkpoint of step 3 not written: rank 0: could not write " in out, out
    assert "rng_rank0.json: No space left on device" in out and "there is no earlier complete checkpoint" in out, out
    assert "Training goes on (checkpoint.on_write_error=continue)" in out, out
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000006"]
    assert result.checkpoint == ckpts / "step_00000006" and result.export == tmp_path / "final"
    assert (tmp_path / "final" / "config.json").is_file()
    assert result.losses == pytest.approx(ref.losses, rel=1e-6, abs=1e-6)  # the failed save changed nothing


def test_disk_full_during_the_export(tmp_path, monkeypatch):
    """The final export fails midway: nothing half-written stays in final/; the same command run again
    resumes from the final checkpoint (checkpoint.save_final) and only exports."""
    args = ["train.max_steps=2", "checkpoint.save_final=true"]
    with monkeypatch.context() as m, pytest.raises(ExportWriteError) as err:
        FullDisk(f"{tmp_path / 'final'}{os.sep}", budget=2000).install(m)
        run(tiny_config(tmp_path, *args), tiny_model(), ToyDataset(16))
    text = str(err.value)
    assert f"export to {tmp_path / 'final'} failed: rank 0: could not write {tmp_path / 'final'}{os.sep}" in text
    assert "No space left on device (errno 28)" in text and "What it had written is removed" in text, text
    assert not (tmp_path / "final").exists()
    again = run(tiny_config(tmp_path, *args), tiny_model(), ToyDataset(16))
    assert again.losses == {} and again.export == tmp_path / "final"
    needed = tensor_bytes(tmp_path / "final")
    assert f"needs about {needed / 1e9:.2f} GB ({needed:,} bytes)" in text, (needed, text)


def test_config_names_the_allowed_values():
    with pytest.raises(ValueError, match="on_write_error='ignore': choose stop or continue"):
        tiny_config("out", "checkpoint.on_write_error=ignore")


Usage = namedtuple("Usage", "total used free")


@pytest.mark.parametrize("total", [10**12, 0])
def test_free_space_is_checked_before_writing(tmp_path, monkeypatch, total):
    """Too little free space: refused before any tensor is written. A filesystem that reports no size
    (total 0: some network and FUSE mounts) is no evidence of a full disk: the save goes ahead."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(total, total, 100))
    created = not dist.is_initialized()
    init_distributed("cpu")
    try:
        model, opt, sched = build(seed=0)
        train_step(model, opt, sched)
        ckpt = Checkpointer(tmp_path / "checkpoints", rank=0)
        if total == 0:
            assert ckpt.save(1, model, opt, {"step": 1}) == tmp_path / "checkpoints" / "step_00000001"
            return
        with pytest.raises(CheckpointWriteError, match=r"not enough free space for the checkpoint \(checked "
                                                        r"before writing\).* has 0\.00 GB \(100 bytes\) free"):
            ckpt.save(1, model, opt, {"step": 1})
        assert not any((tmp_path / "checkpoints").iterdir())
    finally:
        if created:
            dist.destroy_process_group()


def scenario(out: Path) -> None:
    """Under 2 ranks: a save that fails on rank 1 only (in its tensor file, then in its JSON file) raises
    on both ranks, naming rank 1; the ranks stay in step (the next save works) and the last good
    checkpoint loads exactly. Then an export that fails on rank 0 raises on both."""
    created = not dist.is_initialized()
    env = init_distributed("cpu")
    try:
        torch.manual_seed(env.rank)
        model, opt, sched = build(seed=0)
        train_step(model, opt, sched)
        ckpts = Checkpointer(out / "checkpoints", keep_last=0, rank=env.rank)
        good = ckpts.save(1, model, opt, {"step": 1})
        at_good = snapshot(model, opt)
        train_step(model, opt, sched)
        for step, where, budget in ((2, "step_00000002.tmp", 100), (3, f"step_00000003.tmp{os.sep}rng_rank1", 5)):
            patch = pytest.MonkeyPatch()
            if env.rank == 1:
                FullDisk(where, budget).install(patch)
            try:
                ckpts.save(step, model, opt, {"step": step})
                raise AssertionError(f"save of step {step} did not raise on rank {env.rank}")
            except CheckpointWriteError as e:
                assert f"checkpoint of step {step} not written: rank 1: could not write " in str(e), str(e)
                assert "rank 0:" not in str(e) and f"{out / 'checkpoints' / 'step_00000001'}, is untouched" in str(e)
            finally:
                patch.undo()
        ckpts.save(4, model, opt, {"step": 4})
        assert [s for s, _ in list_complete(out / "checkpoints")] == [1, 4]
        model2, opt2, _ = build(seed=0)
        assert ckpts.load(good, model2, opt2) == {"step": 1}
        assert_same(snapshot(model2, opt2), at_good, "loaded after the failed saves")
        export_fails_on_rank0(out / "export", env.rank)
        (out / f"ok_rank{env.rank}").write_text("ok\n")
    finally:
        if created:
            dist.destroy_process_group()


def export_fails_on_rank0(out: Path, rank: int) -> None:
    """The export's writer (rank 0) fails midway while rank 1 still has all-gathers to do: both raise."""
    patch = pytest.MonkeyPatch()
    if rank == 0:
        FullDisk(f"{out / 'final'}{os.sep}", budget=2000).install(patch)
    try:
        run(tiny_config(out, "train.max_steps=1"), tiny_model(), ToyDataset(16))
        raise AssertionError(f"the export did not raise on rank {rank}")
    except ExportWriteError as e:
        assert f"export to {out / 'final'} failed: rank 0: could not write " in str(e), str(e)
    finally:
        patch.undo()


@pytest.mark.slow
def test_ranks_agree_on_a_failed_write(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
             str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"ranks hung after a failed write: {(e.stderr or b'')[-3000:]!r}") from None
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "ok_rank0").is_file() and (tmp_path / "ok_rank1").is_file()


if __name__ == "__main__":  # run by test_ranks_agree_on_a_failed_write under torchrun
    scenario(Path(sys.argv[1]))
