"""Resumable checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of `<dir>/step_00000123/`:
  model + optimizer    DCP shards (each rank writes its own FSDP2 shards) + .metadata;
                       only trainable weights: frozen ones are reloaded from the model source
  trainer_state.pt     step, scheduler, loader position, config (rank 0)
  rng_rank{r}.pt       torch / CUDA / python / numpy RNG states of rank r
  COMPLETE             written last
All of it is first written to `step_00000123.tmp/`; after a barrier rank 0 writes COMPLETE and renames
the directory, which is atomic on one filesystem. `resume=auto` only ever considers renamed
directories that hold COMPLETE, so a run killed mid-write never loads a half-written checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .distributed import barrier

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_complete(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / COMPLETE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_resume(root: Path, resume: str) -> Path | None:
    """resume: "none" -> None; "auto" -> newest complete checkpoint under root (or None);
    otherwise a checkpoint directory that must be complete."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_complete(root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ValueError(f"checkpoint.resume={resume!r}: {path} is not a complete checkpoint (no {COMPLETE} file)")
    return path


class Checkpointer:
    def __init__(self, root: Path, *, keep_last: int = 2, rank: int = 0):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank

    def _state(self, model, optimizer):
        opts = StateDictOptions(ignore_frozen_params=True)
        return {
            "model": get_model_state_dict(model, options=opts),
            "optim": get_optimizer_state_dict(model, optimizer, options=opts),
        }

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        """Collective: every rank calls it. Returns the final directory."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left over by a run killed while writing this very step
                shutil.rmtree(tmp)
        barrier()
        dcp.save(self._state(model, optimizer), checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        barrier()  # every rank's files are on disk before the checkpoint is declared complete
        if self.rank == 0:
            with open(tmp / COMPLETE, "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # an older run's checkpoint of the same step
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        barrier()
        return final

    def load(self, path: Path, model, optimizer) -> dict:
        """Collective. Restores model (trainable weights), optimizer and this rank's RNG; returns the trainer state."""
        path = Path(path)
        state = self._state(model, optimizer)
        dcp.load(state, checkpoint_id=str(path))
        opts = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(model, state["model"], options=opts)
        set_optimizer_state_dict(model, optimizer, state["optim"], options=opts)
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        # Resuming on a different number of ranks works for model and optimizer (DCP reshards); the
        # RNG streams of ranks that did not exist then are left as seeded.
        return torch.load(path / "trainer_state.pt", weights_only=False)

    def clean_partial(self) -> None:
        """Rank 0 removes *.tmp directories of killed runs (they are never loaded, only wasted space)."""
        if self.rank == 0 and self.root.is_dir():
            for child in self.root.iterdir():
                if child.name.endswith(".tmp") and child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, path in list_complete(self.root)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
