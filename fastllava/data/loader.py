"""The training loader: this rank's PackedBatch for every micro-step of every optimizer step, resumable.

The step planner (`packing.PackingPlanner`) splits each optimizer step's `global_batch` samples into
R ranks x M micro-steps of <= `max_tokens` tokens. `StepLoader` walks the plans from a resume point;
DataLoader workers read, tokenize and decode the samples of one bin each and collate them into a
PackedBatch, so the main process only moves ready packs to the device.

Every rank must take part in every micro-step's collectives (FSDP2 all-gathers, reduce-scatters), and
with the same modules: a pack that would skip the vision tower (text-only samples) or be empty (a
short last step, rejected samples) gets a filler sample: one zero image behind one image token (or one
pad token), all labels ignored; for an AnyRes model the zero image is tile x tile pixels, tiled at its grid.
It adds no loss and no label tokens, so the gradient is unchanged.

A worker that dies (killed by a signal, e.g. the OOM killer, or a crash inside an image decoder) is
reported as WorkerCrashed naming the pack it was loading and its samples, instead of torch's bare
"DataLoader worker (pid ...) exited unexpectedly": each worker writes the pack it is loading into a
shared table, read when torch reports the death.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..batch import IGNORE_INDEX, PackedBatch
from .packing import PackingPlanner, collate_pack


class SampleSource(Protocol):
    """What StepLoader needs from a dataset (LlavaDataset has it)."""

    def __len__(self) -> int: ...

    def lengths(self) -> np.ndarray: ...  # (n,) tokens per sample after image expansion

    def __getitem__(self, i: int) -> dict | None: ...  # input_ids, labels, pixel_values|None; None = rejected

    # Optional: describe_sample(i) -> str names sample i (file, entry, id, images) in WorkerCrashed.


@dataclass
class MicroBatch:
    """One rank's pack at one micro-step of one optimizer step."""

    step: int  # global optimizer step (0-based, across epochs)
    micro: int  # micro-step within the step
    num_micro: int  # micro-steps of this step (the same on every rank)
    batch: PackedBatch
    rejected: int  # samples of this bin the dataset rejected
    filler: bool  # a filler sample was added (see module docstring)

    def pin_memory(self) -> "MicroBatch":
        """Called by DataLoader(pin_memory=True): host-to-device copies can then overlap compute."""
        return MicroBatch(self.step, self.micro, self.num_micro, self.batch.pin_memory(), self.rejected, self.filler)


class WorkerCrashed(RuntimeError):
    """A DataLoader worker died while loading a pack; `samples` are the dataset indices it held."""

    def __init__(self, message: str, samples: list[int]):
        super().__init__(message)
        self.samples = samples


class _BinDataset(Dataset):
    """Item k = the k-th bin of this rank, from the resume point on; returns a MicroBatch.

    loading: None, or (num_workers, 2) int64 in shared memory: row w = (pid, k) while worker w loads
    item k, k = -1 between items (what a dead worker held, see WorkerCrashed)."""

    def __init__(self, source, keys, image_token_id, num_image_tokens, filler_image, pad_token_id,
                 loading: torch.Tensor | None = None, anyres=None):
        self.source, self.keys, self.anyres = source, keys, anyres
        self.image_token_id, self.num_image_tokens = image_token_id, num_image_tokens
        self.filler_image, self.pad_token_id = filler_image, pad_token_id
        self.loading = loading

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, k: int) -> MicroBatch:
        worker = get_worker_info()
        if self.loading is None or worker is None:
            return self._load(k)
        self.loading[worker.id, 0], self.loading[worker.id, 1] = os.getpid(), k
        batch = self._load(k)
        self.loading[worker.id, 1] = -1
        return batch

    def _load(self, k: int) -> MicroBatch:
        step, micro, num_micro, indices = self.keys[k]
        samples = [self.source[i] for i in indices]
        batch, rejected = collate_pack(samples, self.image_token_id, self.num_image_tokens, self.anyres)
        filler = False
        if batch is None or (self.filler_image is not None and batch.num_images == 0):
            kept = [s for s in samples if s is not None]
            batch = PackedBatch.from_samples(kept + [self._filler()], image_token_id=self.image_token_id,
                                             num_image_tokens=self.num_image_tokens, anyres=self.anyres)
            filler = True
        return MicroBatch(step, micro, num_micro, batch, rejected, filler)

    def _filler(self) -> dict:
        if self.filler_image is not None:
            sample = {"input_ids": torch.tensor([self.image_token_id]), "labels": torch.tensor([IGNORE_INDEX]),
                      "pixel_values": self.filler_image.unsqueeze(0)}
            if self.anyres is not None:  # zeros in, zeros out: its tiles are the same zero image
                size = tuple(self.filler_image.shape[-2:])
                sample["pixel_values"] = sample["pixel_values"].expand(self.anyres.num_tiles(size), -1, -1, -1)
                sample["image_sizes"] = [size]
            return sample
        return {"input_ids": torch.tensor([self.pad_token_id]), "labels": torch.tensor([IGNORE_INDEX]),
                "pixel_values": None}


def _identity(x):
    return x


# torch's two reports of a dead worker: "DataLoader worker (pid(s) 12, 13) exited unexpectedly" from the
# iterator, "DataLoader worker (pid 12) is killed by signal: Killed." from its SIGCHLD handler.
_DEAD_PIDS = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")


def _crash_error(exc: BaseException, data: _BinDataset, rank: int) -> WorkerCrashed | None:
    """torch's report of a dead worker of `data`'s loader as a WorkerCrashed naming the pack(s) it was
    loading; None for any other error. If torch's wording ever changes, every pack in a worker is named."""
    if data.loading is None or not isinstance(exc, RuntimeError) or "DataLoader worker" not in str(exc):
        return None
    match = _DEAD_PIDS.search(str(exc))
    dead = None if match is None else {int(p) for p in match.group(1).replace(",", " ").split()}
    rows = [(pid, k) for pid, k in data.loading.tolist() if pid >= 0 and (dead is None or pid in dead)]
    if not rows:
        return None  # a worker of another DataLoader
    held = [k for _, k in rows if k >= 0]
    if not held:
        return WorkerCrashed(f"a DataLoader worker of rank {rank} died between packs, holding no sample "
                             f"(torch: {exc})", [])
    describe = getattr(data.source, "describe_sample", None)
    lines, samples = [], []
    for k in held:
        step, micro, num_micro, indices = data.keys[k]
        lines.append(f"step {step}, micro-step {micro + 1}/{num_micro}:")
        lines += [f"  sample {i}" + (f": {describe(i)}" if describe else "") for i in indices]
        samples += list(indices)
    which = "while loading" if dead is not None else "with these packs in its workers (which one died is unknown)"
    return WorkerCrashed(
        f"a DataLoader worker of rank {rank} died {which}\n" + "\n".join(lines) + "\n"
        "A crash inside an image decoder or the kernel's OOM killer (dmesg names it) are the usual causes: "
        "load these samples' images alone (fastllava.data.load_image), or set data.num_workers=0 so that "
        f"the main process shows the failing call. torch: {exc}", samples)


def _raise_named(exc: RuntimeError, data: _BinDataset, rank: int):
    named = _crash_error(exc, data, rank)
    if named is None:
        raise exc
    raise named from exc


@contextmanager
def _naming_crashes(data: _BinDataset, rank: int):
    """While the loader runs, name the pack of a worker that dies. torch's SIGCHLD handler reports a dead
    worker by raising from wherever the main thread is, most often inside the training step, out of the
    loader's reach; a handler chained in front of it (as torch chains its own) renames that error."""
    previous = signal.getsignal(signal.SIGCHLD) if hasattr(signal, "SIGCHLD") else None
    if data.loading is None or not callable(previous) or threading.current_thread() is not threading.main_thread():
        yield  # no handler of torch's to wrap (no workers, Windows, a thread): the iterator's errors only
        return

    def handler(signum, frame):
        try:
            previous(signum, frame)
        except RuntimeError as e:
            _raise_named(e, data, rank)

    signal.signal(signal.SIGCHLD, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGCHLD) is handler:
            signal.signal(signal.SIGCHLD, previous)


class StepLoader:
    """Iterate `for step, micro_batches in loader` -> this rank's list of MicroBatch for each step.

    source: a SampleSource. global_batch: samples per optimizer step over all ranks (the paper's 256 /
    128). max_tokens: token budget of one pack. filler_image: (3, H, W) zeros when the model has a
    vision tower and more than one rank runs (see module docstring), else None. anyres: the model's
    AnyResGrid (LlavaConfig.anyres) when it is LLaVA-NeXT's: samples then carry tiles and image_sizes.
    """

    def __init__(self, source: SampleSource, *, global_batch: int, max_tokens: int, rank: int, world_size: int,
                 epochs: int, seed: int, image_token_id: int, num_image_tokens: int,
                 filler_image: torch.Tensor | None = None, pad_token_id: int = 0, num_workers: int = 0,
                 pin_memory: bool = False, anyres=None):
        if global_batch < world_size:
            raise ValueError(f"global batch {global_batch} is smaller than the {world_size} ranks; every rank needs samples")
        self.source = source
        lengths = np.asarray(source.lengths())
        if lengths.shape != (len(source),):
            raise ValueError(f"dataset.lengths() has shape {lengths.shape}, expected ({len(source)},)")
        self.planner = PackingPlanner(lengths, max_tokens, num_ranks=world_size, seed=seed, global_batch=global_batch)
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.image_token_id, self.num_image_tokens = image_token_id, num_image_tokens
        self.filler_image, self.pad_token_id, self.anyres = filler_image, pad_token_id, anyres
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.steps_per_epoch = [len(self.planner.plan_epoch(e)) for e in range(epochs)]
        self.next_step = 0  # global step the next iteration starts from: the run's one position
        self.stop_step: int | None = None  # iteration ends before this step (default: the end of the last epoch)

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all epochs."""
        return sum(self.steps_per_epoch)

    def _locate(self, step: int) -> tuple[int, int]:
        """Global step -> (epoch, step within the epoch)."""
        for epoch, n in enumerate(self.steps_per_epoch):
            if step < n:
                return epoch, step
            step -= n
        return self.epochs, 0

    def plan(self, step: int):
        """The StepPlan of global optimizer step `step` (0-based, across epochs)."""
        epoch, idx = self._locate(step)
        return self.planner.plan_epoch(epoch)[idx]

    def state_dict(self) -> dict:
        """The position (JSON-able): the next step, and what the plan depends on."""
        return {"next_step": self.next_step, "plan": self.planner.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(); ValueError when the data, batch, ranks or seed changed since."""
        self.planner.check(state["plan"])
        self.next_step = int(state["next_step"])

    def _keys(self, start: int, stop: int) -> list:
        keys = []
        for step in range(start, stop):
            bins = self.plan(step).rank(self.rank)
            keys.extend((step, m, len(bins), list(b)) for m, b in enumerate(bins))
        return keys

    def __iter__(self) -> Iterator[tuple[int, list[MicroBatch]]]:
        start = self.next_step
        stop = self.total_steps if self.stop_step is None else min(self.stop_step, self.total_steps)
        loading = None  # (pid, pack) per worker, see _BinDataset
        if self.num_workers:
            loading = torch.full((self.num_workers, 2), -1, dtype=torch.int64).share_memory_()
        data = _BinDataset(self.source, self._keys(start, stop), self.image_token_id,
                           self.num_image_tokens, self.filler_image, self.pad_token_id, loading, self.anyres)
        # A generator of its own: DataLoader draws its workers' base seed from it when iteration starts,
        # which would otherwise advance the global torch RNG (dropout's) at a different point of a resumed
        # run than of the uninterrupted one. Nothing the workers do is random.
        loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=self.num_workers,
                            collate_fn=_identity, pin_memory=self.pin_memory,
                            prefetch_factor=4 if self.num_workers else None,
                            persistent_workers=False, generator=torch.Generator().manual_seed(0))
        batches = iter(loader)  # starts the workers, and torch's SIGCHLD handler with them
        pending: list[MicroBatch] = []
        with _naming_crashes(data, self.rank):
            while True:
                try:
                    mb = next(batches)
                except StopIteration:
                    return
                except RuntimeError as e:
                    _raise_named(e, data, self.rank)
                pending.append(mb)
                if len(pending) == mb.num_micro:
                    assert all(p.step == mb.step for p in pending)
                    self.next_step = mb.step + 1
                    yield mb.step, pending
                    pending = []
