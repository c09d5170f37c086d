"""The checkpoint format: only .safetensors and .json on disk, nothing unpickled on load, exact resume.

A small FSDP2-sharded model (shapes chosen so that 2 ranks get shards of different sizes, and one rank
an empty shard) with a frozen layer, AdamW and a LambdaLR schedule; the training step draws from the
torch, python and numpy RNGs, so a resume is exact only if they are restored too. `scenario` runs
in-process (a world of one) and under torchrun with 2 gloo processes (this file is its script).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from fastllava.train.checkpoint import COMPLETE, Checkpointer, list_complete, rng_state
from fastllava.train.distributed import init_distributed

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
VOCAB, DIM, HIDDEN = 11, 6, 10  # 11 embedding rows -> shards of 6 and 5 rows on 2 ranks


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.norm = nn.Parameter(torch.ones(DIM))

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x * self.norm)))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.tower = nn.Linear(DIM, DIM)  # frozen: never saved
        self.tower.requires_grad_(False)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.scale = nn.Parameter(torch.full((1,), 0.9))  # one row: the second rank's shard is empty
        self.head = nn.Linear(DIM, 7)  # bias of 7 -> shards of 4 and 3

    def forward(self, ids, target):
        x = self.tower(self.embed(ids))
        for block in self.blocks:
            x = block(x)
        return nn.functional.cross_entropy(self.head(x) * self.scale, target)


def build(seed: int):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Toy()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.01},
                             {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    return model, opt, sched


def train_step(model, opt, sched) -> float:
    """Data and a loss weight drawn from all three RNGs of this rank."""
    ids = torch.randint(0, VOCAB, (12,))
    target = torch.randint(0, 7, (12,))
    weight = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
    loss = model(ids, target) * weight
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def snapshot(model, opt) -> dict:
    """This rank's shards of the parameters and of the optimizer state, and the lrs."""
    names = {p: n for n, p in model.named_parameters()}
    out = {f"param.{n}": local(p) for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"optim.{names[p]}.{k}"] = local(v)
    out["lrs"] = torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float64)
    return out


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k}"


def header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def scenario(out: Path) -> None:
    """Train 3 steps, save, train 3 more; then load into a fresh model/optimizer and train the same
    3 steps: every loss, parameter shard and optimizer-state shard equal bit for bit."""
    created = not dist.is_initialized()
    env = init_distributed("cpu")
    try:
        seed = 1000 + env.rank
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        model, opt, sched = build(seed=0)
        for _ in range(3):
            train_step(model, opt, sched)
        ckpt = Checkpointer(out / "checkpoints", keep_last=1, rank=env.rank)
        trainer_state = {"step": 3, "scheduler": sched.state_dict(), "nested": {"t": (1, 2.5), "none": None}}
        path = ckpt.save(3, model, opt, trainer_state)
        at_save, rng_at_save = snapshot(model, opt), rng_state()
        full = [train_step(model, opt, sched) for _ in range(3)]
        full_end = snapshot(model, opt)

        # A fresh model, optimizer and schedule, and other RNG states. Frozen weights come from the model
        # source (the same seed); the trainable ones are perturbed to prove that they come from the file.
        torch.manual_seed(99), random.seed(99), np.random.seed(99)
        model2, opt2, sched2 = build(seed=0)
        with torch.no_grad():
            for p in model2.parameters():
                if p.requires_grad:
                    p.add_(0.5)
        state = ckpt.load(path, model2, opt2)
        sched2.load_state_dict(state["scheduler"])
        assert state["step"] == 3 and state["nested"] == {"t": [1, 2.5], "none": None}
        assert_same(snapshot(model2, opt2), at_save, "after load")
        assert rng_state() == rng_at_save
        resumed = [train_step(model2, opt2, sched2) for _ in range(3)]
        assert resumed == full, (resumed, full)
        assert_same(snapshot(model2, opt2), full_end, "after 3 more steps")

        check_files(path, model, env.world_size)
        groups = json.loads((path / "optimizer.json").read_text())["param_groups"]
        assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and groups[0]["betas"] == [0.9, 0.95]
        assert isinstance(opt2.param_groups[0]["betas"], tuple)

        # keep_last=1: a second save prunes the first.
        ckpt.save(6, model2, opt2, {"step": 6})
        assert [s for s, _ in list_complete(out / "checkpoints")] == [6]
        if env.rank == 0:
            (out / f"ok_world{env.world_size}").write_text("ok\n")
    finally:
        if created:
            dist.destroy_process_group()


def check_files(path: Path, model, world: int) -> None:
    """JSON and safetensors only; no frozen weights; every trainable tensor there, sharded over the ranks."""
    files = sorted(p.name for p in path.iterdir())
    assert all(n == COMPLETE or n.endswith((".json", ".safetensors")) for n in files), files
    assert {"trainer_state.json", "optimizer.json", COMPLETE} | {f"rng_rank{r}.json" for r in range(world)} <= set(files)
    shards = [path / n for n in files if n.endswith(".safetensors")]
    keys: dict[str, list] = {}
    for f in shards:
        sharding = json.loads(header(f)["__metadata__"]["DCP_SHARDING_INFO"])
        for k, v in sharding.items():
            keys.setdefault(k, []).append(v["saved_offsets"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = {f"model.{n}" for n in trainable}
    expected |= {f"optim.{n}.{k}" for n in trainable for k in ("exp_avg", "exp_avg_sq", "step")}
    assert set(keys) == expected, set(keys) ^ expected
    assert not any("tower" in k for k in keys)
    # Shards: one per rank for the sharded tensors, one copy of each replicated scalar step.
    assert all(len(keys[k]) == (1 if k.endswith(".step") else world) for k in keys), keys
    if world == 2:
        assert len(shards) == 2 and keys["model.embed.weight"] == [[0, 0], [6, 0]]


def test_save_load_exact_one_process(tmp_path, monkeypatch):
    # Nothing may unpickle while loading: pickle.load(s) raise, torch.load only with weights_only=True.
    def refuse(*a, **k):
        raise AssertionError("pickle.load called")

    real_load = torch.load

    def checked_load(*a, weights_only=None, **k):
        assert weights_only is True, "torch.load without weights_only=True"
        return real_load(*a, weights_only=True, **k)

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", checked_load)
    scenario(tmp_path)
    assert (tmp_path / "ok_world1").is_file()


@pytest.mark.slow
def test_save_load_exact_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "ok_world2").is_file()


# --- refusing pickles -------------------------------------------------------------------------------


class Evil:
    """Unpickling it creates the file `marker` (a stand-in for running any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A valid one-process checkpoint to tamper with (copied per test)."""
    out = tmp_path_factory.mktemp("saved")
    created = not dist.is_initialized()
    init_distributed("cpu")
    try:
        torch.manual_seed(0)
        model, opt, sched = build(seed=0)
        train_step(model, opt, sched)
        return Checkpointer(out, rank=0).save(1, model, opt, {"step": 1, "scheduler": sched.state_dict()})
    finally:
        if created:
            dist.destroy_process_group()


def _load(path: Path):
    created = not dist.is_initialized()
    init_distributed("cpu")
    try:
        model, opt, _ = build(seed=0)
        return Checkpointer(path.parent, rank=0).load(path, model, opt)
    finally:
        if created:
            dist.destroy_process_group()


def _tamper(case: str, path: Path, marker: Path) -> str:
    """Make `path` carry a pickled Evil; returns the name of the file the error must name."""
    evil = {"step": 1, "payload": Evil(marker)}
    shard = next(p for p in path.iterdir() if p.name.endswith(".safetensors"))
    if case == "old_trainer_state_pt":  # the previous format's trainer state next to the new files
        torch.save(evil, path / "trainer_state.pt")
        return "trainer_state.pt"
    if case == "old_dcp_metadata":  # DCP's default format: .metadata is read with pickle.load
        (path / ".metadata").write_bytes(pickle.dumps(evil))
        return ".metadata"
    if case == "pickle_as_json":
        (path / "trainer_state.json").write_bytes(pickle.dumps(evil))
        return "trainer_state.json"
    if case == "torch_save_as_json":
        torch.save(evil, path / "rng_rank0.json")
        return "rng_rank0.json"
    if case == "torch_save_as_safetensors":
        torch.save(evil, shard)
        return shard.name
    if case == "pickle_in_unknown_file":
        (path / "extra_state").write_bytes(pickle.dumps(evil))
        return "extra_state"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["old_trainer_state_pt", "old_dcp_metadata", "pickle_as_json",
                                  "torch_save_as_json", "torch_save_as_safetensors", "pickle_in_unknown_file"])
def test_refuses_pickled_objects_without_running_them(case, saved, tmp_path):
    import shutil

    path = tmp_path / saved.name
    shutil.copytree(saved, path)
    marker = tmp_path / "code_ran"
    name = _tamper(case, path, marker)
    with pytest.raises(ValueError, match="could run code") as err:
        _load(path)
    assert name in str(err.value)
    assert not marker.exists()
    # The payload is live: unpickling it does run its code (here, on purpose, outside the loader).
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Evil(live)))
    assert live.exists()


def test_refuses_a_whole_old_format_checkpoint(tmp_path):
    """A checkpoint as the previous format wrote it: DCP .metadata/.distcp + trainer_state.pt."""
    import torch.distributed.checkpoint as dcp

    created = not dist.is_initialized()
    init_distributed("cpu")
    try:
        model, opt, sched = build(seed=0)
        train_step(model, opt, sched)
        old = tmp_path / "step_00000001"
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(old))
        torch.save({"step": 1}, old / "trainer_state.pt")
        (old / COMPLETE).write_text("1\n")
        with pytest.raises(ValueError, match=r"\.metadata.*could run code"):
            Checkpointer(tmp_path, rank=0).load(old, *build(seed=0)[:2])
    finally:
        if created:
            dist.destroy_process_group()


def test_trainer_state_must_be_json(tmp_path):
    created = not dist.is_initialized()
    init_distributed("cpu")
    try:
        model, opt, sched = build(seed=0)
        ckpt = Checkpointer(tmp_path, rank=0)
        with pytest.raises(TypeError, match=r"trainer_state\['x'\] is a Tensor"):
            ckpt.save(1, model, opt, {"x": torch.ones(1)})
        with pytest.raises(TypeError, match="str keys"):
            ckpt.save(1, model, opt, {"loader": {3: "a"}})
        assert not any(tmp_path.iterdir())  # refused before anything was written
    finally:
        if created:
            dist.destroy_process_group()


if __name__ == "__main__":  # run by test_save_load_exact_two_processes under torchrun
    scenario(Path(sys.argv[1]))
