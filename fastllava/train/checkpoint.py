"""Resumable checkpoints in a format that cannot run code on load, written atomically.

Layout of `<dir>/step_00000123/` (only .safetensors and .json files; nothing is ever unpickled):
  shard-0000{r+1}-model-00001-of-00001.safetensors
                       written by torch.distributed.checkpoint (DCP) through its HuggingFaceStorageWriter:
                       each rank stores its own FSDP2 shards of a flat dict of tensors,
                       "model.<fqn>" (trainable weights only: frozen ones come from the model source) and
                       "optim.<fqn>.<state>" (AdamW's exp_avg, exp_avg_sq, step); the offset of each shard
                       in the full tensor is JSON in the safetensors header. A replicated tensor (AdamW's
                       scalar step) is stored once, by one rank, so a rank may have no file.
  optimizer.json       the optimizer's param_groups without the tensors: lr (as set by the scheduler at
                       the save), betas, weight decay, ... and the parameter names of each group (rank 0)
  trainer_state.json   step, scheduler, loader position, config: the caller's dict (rank 0)
  rng_rank{r}.json     torch / CUDA (base64 bytes), python `random`, numpy RNG states of rank r
  COMPLETE             written last
All of it is first written to `step_00000123.tmp/`; after a barrier rank 0 writes COMPLETE and renames
the directory, which is atomic on one filesystem. `resume=auto` only ever considers renamed
directories that hold COMPLETE, so a run killed mid-write never loads a half-written checkpoint.

A write that fails (a full disk, an I/O error, on any rank) raises CheckpointWriteError on every rank:
after each phase (prepare, write, mark complete) the ranks exchange their outcome, so none is left
waiting in a barrier for a rank that gave up. The error names the file, the checkpoint's size and the
free space; the partial directory is removed and the previous complete checkpoint is untouched. Before
writing, every rank checks that its filesystem has room for the whole checkpoint (all ranks may share
it), so a write that cannot fit is not started.

Why not DCP's default format or torch.save: DCP's FileSystemReader unpickles `.metadata` with
pickle.load and its default planner loads non-tensor items with torch.load(weights_only=False); a
pickle can run any code when loaded. Here DCP only ever sees tensors and reads its metadata from the
safetensors headers (JSON). `load` checks every file of the directory first and refuses, with a
ValueError naming the file, anything that is or looks like a pickle (an old-format checkpoint's
`.metadata`, `*.distcp`, `trainer_state.pt`, ...), without reading it any further.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .distributed import all_gather_objects

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.json"
FORMAT_VERSION = 1
_TENSORS_SUFFIX = ".safetensors"
# Names that pickle-based checkpoints use: DCP's default format, torch.save, pickle.
_PICKLE_NAMES = re.compile(r"(^\.metadata$|^__\d+_?\.metadata$|\.(distcp|pt|pth|pkl|pickle|bin|ckpt)$)")


# --- JSON-only values --------------------------------------------------------------------------------


def _check_json(value, where: str) -> None:
    """Raise TypeError unless `value` survives a JSON round trip (tuples become lists)."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        return  # json writes repr(): exact; NaN / inf as the NaN / Infinity literals Python reads back
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; checkpoint JSON needs str keys")
            _check_json(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; checkpoints store only JSON values "
                    "(dict with str keys, list, tuple, str, int, float, bool, None)")


def _write_json(path: Path, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path):
    _refuse_pickle_content(path)
    try:
        with open(path) as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint file {path} is not valid JSON: {e}") from None


# --- RNG ---------------------------------------------------------------------------------------------


def _bytes_to_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _b64_to_bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    """This process's RNG states as a JSON-serializable dict."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": _bytes_to_b64(torch.get_rng_state()),
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = _bytes_to_b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    """Restore this process's RNG states from rng_state()'s dict."""
    torch.set_rng_state(_b64_to_bytes(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_b64_to_bytes(state["cuda"]))


# --- refusing pickles ----------------------------------------------------------------------------------


def _not_accepted(path: Path, what: str) -> ValueError:
    return ValueError(
        f"checkpoint file {path}: {what}. This format is not accepted because loading it could run code "
        f"(pickle); fastllava checkpoints hold only .safetensors and .json files. An old-format checkpoint "
        "(DCP .metadata/.distcp, trainer_state.pt) must be converted by someone who trusts its origin.")


def _refuse_pickle_content(path: Path) -> None:
    """ValueError if the file starts like a pickle or a torch.save archive (a zip holding a pickle)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise _not_accepted(path, "it is a pickle")
    if head == b"PK\x03\x04":
        raise _not_accepted(path, "it is a zip archive, as torch.save writes (it holds a pickle)")


def _check_safetensors(path: Path) -> None:
    """ValueError unless the file is a safetensors file: 8-byte header length, then a JSON object."""
    _refuse_pickle_content(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        ok = 0 < n <= size - 8
        if ok:
            try:
                ok = isinstance(json.loads(f.read(n)), dict)
            except (UnicodeDecodeError, json.JSONDecodeError):
                ok = False
    if not ok:
        raise ValueError(f"checkpoint file {path} is not a safetensors file (bad header)")


def check_checkpoint_files(path: Path) -> None:
    """Refuse (ValueError naming the file) a checkpoint directory holding anything that is, or is named
    like, a pickle; check the headers of the safetensors files. Reads only each file's first bytes and the
    safetensors headers (JSON), never a whole file."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is not a directory")
    for child in sorted(path.rglob("*")):
        if child.is_dir():
            continue
        if _PICKLE_NAMES.search(child.name):
            raise _not_accepted(child, "its name is that of a pickle-based format (DCP .metadata/.distcp, torch.save)")
        if child.name.endswith(_TENSORS_SUFFIX):
            if child.parent != path:
                raise ValueError(f"checkpoint file {child}: tensors are expected directly in {path}")
            _check_safetensors(child)
        else:
            _refuse_pickle_content(child)
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(f"{path} is not a fastllava checkpoint: no {TRAINER_STATE}")


# --- model + optimizer as a flat dict of tensors -------------------------------------------------------


def _opts(**kw) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=True, **kw)


def _flat_state(model, optimizer) -> tuple[dict, dict]:
    """(flat {name: tensor}, optimizer state_dict whose tensors are the same objects). The optimizer
    state is created (a zero-lr step) if the optimizer has not stepped yet, so a fresh optimizer has
    the tensors to load into."""
    flat = {}
    for fqn, t in get_model_state_dict(model, options=_opts()).items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model state {fqn!r} is a {type(t).__name__}, not a tensor")
        flat[f"model.{fqn}"] = t
    osd = get_optimizer_state_dict(model, optimizer, options=_opts())
    for fqn, per_param in osd["state"].items():
        for key, t in per_param.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"optimizer state {fqn!r}[{key!r}] is a {type(t).__name__}, not a tensor: "
                                "this checkpoint format stores tensors only")
            flat[f"optim.{fqn}.{key}"] = t
    return flat, osd


def _param_groups_json(osd: dict) -> list[dict]:
    groups = []
    for i, g in enumerate(osd["param_groups"]):
        g = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        _check_json(g, f"optimizer.param_groups[{i}]")
        groups.append(g)
    return groups


def _merge_param_groups(current: list[dict], saved: list[dict], where: Path) -> list[dict]:
    """The saved hyperparameters (lr as the scheduler left it, betas, ...) on the current groups."""
    if len(saved) != len(current) or any(list(s["params"]) != list(c["params"]) for s, c in zip(saved, current)):
        raise ValueError(f"{where}: the optimizer's parameter groups differ from the checkpoint's "
                         "(trainable parameters or grouping changed)")
    merged = []
    for c, s in zip(current, saved):
        g = dict(c)
        for k, v in s.items():
            if k != "params":
                g[k] = tuple(v) if isinstance(c.get(k), tuple) and isinstance(v, list) else v
        merged.append(g)
    return merged


def _hf_writer(path: Path) -> HuggingFaceStorageWriter:
    # Every rank writes its own shards (no rank-0 gather, no consolidation). torch >= 2.11 (pyproject's
    # floor) names the flag save_distributed.
    return HuggingFaceStorageWriter(str(path), save_distributed=True)


# --- failed writes ---------------------------------------------------------------------------------------


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written on some rank (full disk, I/O error); raised on every rank."""


def checkpoint_bytes(flat: dict) -> int:
    """Bytes of the tensors of a checkpoint, all ranks together (a DTensor counts its full shape), which is
    what the files hold, less their small headers and JSON."""
    return sum(t.numel() * t.element_size() for t in flat.values())


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent); None where the
    filesystem reports no size (some network and FUSE mounts report 0 total), which is no evidence of
    a full disk."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return usage.free if usage.total > 0 else None


def size_text(n: int) -> str:
    return f"{n / 1e9:.2f} GB ({n:,} bytes)"


def gather_failures(failure: str | None) -> list[tuple[int, str]]:
    """Collective: (rank, what failed) of every rank whose `failure` is not None, the same list on every
    rank, so that all of them raise together instead of some waiting for a rank that gave up."""
    outcomes = all_gather_objects(failure, where="a checkpoint write's outcome")
    return [(r, text) for r, text in enumerate(outcomes) if text is not None]


def failures_text(failed: list[tuple[int, str]], needed: int, where: Path) -> str:
    """The failures of gather_failures, the bytes the write needs and the free space at `where`."""
    free = free_bytes(where)
    return ("; ".join(f"rank {r}: {text}" for r, text in failed)
            + f". It needs about {size_text(needed)}; {where} has "
            + (f"{size_text(free)} free" if free is not None else "no free-space figure"))


def attempt_write(phase) -> str | None:
    """Run `phase` (a save's or an export's writing); None, or what failed as a line. Only write failures
    (OSError, here or inside DCP, which gathers the ranks' failures itself) are caught: anything else is a
    bug to raise."""
    try:
        phase()
    except OSError as e:
        return describe_write_error(e)
    except CheckpointException as e:
        causes = [exc for exc, _ in e.failures.values()]
        if not all(isinstance(c, OSError) for c in causes):
            raise
        # DCP raises on every rank with every rank's failure; each rank reports its own (or none).
        mine = e.failures.get(dist.get_rank() if dist.is_initialized() else 0)
        return describe_write_error(mine[0]) if mine else None
    return None


def describe_write_error(e: OSError) -> str:
    where = f" {e.filename}" if e.filename else ""
    return f"could not write{where}: {e.strerror or e}" + (f" (errno {e.errno})" if e.errno else "")


# --- listing ---------------------------------------------------------------------------------------------


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
    """Writes, prunes and loads the checkpoints under `root` for rank `rank` (see the module docstring)."""

    def __init__(self, root: Path, *, keep_last: int = 2, rank: int = 0):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        """Collective: every rank calls it. `trainer_state` must be JSON-serializable (dicts with str
        keys, lists, tuples -> lists, str, int, float, bool, None); rank 0 writes it. Returns the final
        directory. A failed write raises CheckpointWriteError on every rank (module docstring)."""
        # Checked on every rank before any collective, so a bad value raises everywhere instead of hanging.
        _check_json(trainer_state, "trainer_state")
        flat, osd = _flat_state(model, optimizer)
        groups = _param_groups_json(osd)
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        needed = checkpoint_bytes(flat)

        def prepare():
            if self.rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():  # left over by a run killed while writing this very step
                    shutil.rmtree(tmp)
                tmp.mkdir()
            free = free_bytes(self.root)
            if free is not None and free < needed:
                raise OSError(errno.ENOSPC, "not enough free space for the checkpoint (checked before writing)",
                              str(self.root))

        def write():
            dcp.save(flat, storage_writer=_hf_writer(tmp))
            _write_json(tmp / f"rng_rank{self.rank}.json", rng_state())
            if self.rank == 0:
                _write_json(tmp / OPTIMIZER, {"format": FORMAT_VERSION, "param_groups": groups})
                _write_json(tmp / TRAINER_STATE, trainer_state)

        def complete():
            if self.rank == 0:
                with open(tmp / COMPLETE, "w") as f:
                    f.write(f"{step}\n")
                    f.flush()
                    os.fsync(f.fileno())
                if final.exists():  # an older run's checkpoint of the same step
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self._prune()

        # Each exchange also stands for the barrier the phase needs: rank 0 has made the directory before
        # anyone writes; every rank's files are on disk before the checkpoint is declared complete.
        for phase in (prepare, write, complete):
            self._agree(attempt_write(phase), step, tmp, needed)
        return final

    def _agree(self, failure: str | None, step: int, tmp: Path, needed: int) -> None:
        """Collective: every rank learns every rank's outcome of a phase; if any failed, rank 0 removes the
        partial directory and every rank raises the same CheckpointWriteError."""
        failed = gather_failures(failure)
        if not failed:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_complete(self.root)
        raise CheckpointWriteError(
            f"checkpoint of step {step} not written: {failures_text(failed, needed, self.root)}. "
            "The partial directory is removed; "
            + (f"the newest complete checkpoint, {previous[-1][1]}, is untouched and is what "
               "checkpoint.resume=auto loads" if previous else "there is no earlier complete checkpoint")
            + ". Free space or point checkpoint.dir at a larger disk; checkpoint.on_write_error=continue "
            "trains on without the checkpoints that fail.")

    def load(self, path: Path, model, optimizer) -> dict:
        """Collective. Restores model (trainable weights), optimizer (state and param_groups'
        hyperparameters) and this rank's RNG; returns the trainer state. Raises ValueError, before
        reading any tensor, if the directory holds a pickle or a file named like one."""
        path = Path(path)
        # Every rank checks (the files are small headers) so that all raise together, before any collective.
        check_checkpoint_files(path)
        optim_json = _read_json(path / OPTIMIZER) if (path / OPTIMIZER).is_file() else None
        if not isinstance(optim_json, dict) or optim_json.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path / OPTIMIZER}: missing, or not written by this checkpoint format")
        trainer_state = _read_json(path / TRAINER_STATE)

        flat, osd = _flat_state(model, optimizer)
        groups = _merge_param_groups(osd["param_groups"], optim_json["param_groups"], path / OPTIMIZER)
        # In place into the (sharded) tensors of `flat`, which are those of the two state dicts.
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path)))
        model_sd = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
        set_model_state_dict(model, model_sd, options=_opts(strict=False))
        osd = {"state": osd["state"], "param_groups": groups}
        set_optimizer_state_dict(model, optimizer, osd, options=_opts(strict=False))

        rng_file = path / f"rng_rank{self.rank}.json"
        if rng_file.is_file():
            set_rng_state(_read_json(rng_file))
        # Resuming on a different number of ranks would work for model and optimizer (DCP reshards), but
        # the loop's data plan refuses it; the RNG streams of ranks that did not exist are left as seeded.
        return trainer_state

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
