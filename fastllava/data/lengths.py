"""The cold start's heavy part: every sample's length, tokenized over the node's cores, computed once per node.

`pooled_lengths` runs tokenize.batch_lengths over chunks of samples in a pool of forked processes; each
chunk's result is the serial one (batch_lengths treats every conversation on its own), so the lengths are
bit-identical for any worker count. Fork, as torch's DataLoader workers do from the same training
process: the workers inherit the records, tokenizer and template instead of unpickling them, and no
module is re-imported (spawn would re-run a training script that lacks an `if __name__ == "__main__"`
guard). On a 665K-entry mix665k-shaped file (benchmarks/bench_startup.py, 2-core CPU, 2026-12-06) the
lengths took 113 s with 2 workers, 193 s serially (84 s with 2 workers once over-long samples were
tokenized once: docs/data.md, "Start-up").

`cache_lock` makes the ranks of a node (every process that shares the cache directory) take turns: the
first computes and writes the cache, the others block in flock and then read it, instead of all of them
tokenizing the same file at once, each on one core. A process that dies releases its lock (the kernel
drops it), so the next one computes.

Worker count: FASTLLAVA_LENGTH_WORKERS if set, else the cores this process may run on
(os.sched_getaffinity, which respects taskset, cgroups' cpusets and torchrun's NUMA binding).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
from typing import Callable, Iterator, Sequence

import numpy as np

from .files import SampleError
from .templates import Template
from .tokenize import Fit, batch_lengths

WORKERS_ENV = "FASTLLAVA_LENGTH_WORKERS"
CHUNK = 2048  # conversations per batched tokenizer call and per task of the pool

_job = None  # (get_turns, tokenizer, template, fit, get_image_tokens) in a pool worker, inherited through fork


def length_workers(requested: int | None = None) -> int:
    """Processes that tokenize for lengths: `requested`, else $FASTLLAVA_LENGTH_WORKERS, else the cores
    this process may use. ValueError names the setting when it is not a positive integer."""
    if requested is None:
        value = os.environ.get(WORKERS_ENV)
        if not value:
            return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        try:
            requested = int(value)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV}={value!r}: expected a positive integer (processes)") from None
    if requested < 1:
        raise ValueError(f"length workers must be >= 1, got {requested} (argument or {WORKERS_ENV})")
    return requested


def _init_worker(job) -> None:
    global _job
    _job = job
    # One tokenizer thread per worker: the pool already uses every core, rayon's threads would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _run_chunk(job, bounds: tuple[int, int]):
    get_turns, tokenizer, template, fit, get_image_tokens = job
    lo, hi = bounds
    counts, unreadable = None, {}
    if get_image_tokens is not None:  # AnyRes: each image's count from its header, read here, in the pool
        counts = []
        for i in range(lo, hi):
            try:
                counts.append(get_image_tokens(i))
            except SampleError as e:
                counts.append(())  # its length is not used: the sample is rejected below
                unreadable[i - lo] = e
    turns = [[] if i - lo in unreadable else get_turns(i) for i in range(lo, hi)]
    lens, cuts, errors = batch_lengths(turns, tokenizer, template, fit, counts)
    for k, e in unreadable.items():
        lens[k], cuts[k], errors[k] = 0, False, e
    return lo, lens, cuts, {k: (e.reason, e.detail) for k, e in errors.items()}  # SampleError does not pickle


def _pool_chunk(bounds: tuple[int, int]):
    return _run_chunk(_job, bounds)


def pooled_lengths(n: int, get_turns: Callable[[int], Sequence[dict]], tokenizer, template: Template, fit: Fit,
                   *, get_image_tokens: Callable[[int], Sequence[int]] | None = None, workers: int = 1,
                   chunk: int = CHUNK, on_chunk: Callable[[int], None] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, dict[int, SampleError]]:
    """batch_lengths of the conversations get_turns(0), ..., get_turns(n - 1), in chunks of `chunk`, over
    `workers` forked processes (in this process when one worker suffices, or where fork is unavailable
    or this is a daemonic process, such as a DataLoader worker, which may not have children).
    get_image_tokens(i): the placeholder count of each image of conversation i (AnyRes: from the image
    headers, so the pool reads them too), or SampleError to reject it; None: fit.num_image_tokens each.

    Returns lengths (n,) int64 (0 where rejected), truncated (n,) bool and {position: SampleError}, exactly
    what batch_lengths over all n gives. on_chunk(count) is called as each chunk finishes (progress).
    """
    lengths = np.zeros(n, dtype=np.int64)
    truncated = np.zeros(n, dtype=bool)
    errors: dict[int, SampleError] = {}
    bounds = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    workers = min(workers, len(bounds))
    pooled = workers > 1 and "fork" in mp.get_all_start_methods() and not mp.current_process().daemon
    job = (get_turns, tokenizer, template, fit, get_image_tokens)
    with contextlib.ExitStack() as stack:
        if pooled:
            pool = stack.enter_context(mp.get_context("fork").Pool(workers, _init_worker, (job,)))
            results = pool.imap_unordered(_pool_chunk, bounds)
        else:
            results = (_run_chunk(job, b) for b in bounds)
        for lo, lens, cuts, errs in results:
            lengths[lo : lo + len(lens)], truncated[lo : lo + len(cuts)] = lens, cuts
            errors.update({lo + k: SampleError(*e) for k, e in errs.items()})
            if on_chunk is not None:
                on_chunk(len(lens))
    return lengths, truncated, errors


@contextlib.contextmanager
def cache_lock(lock_path: str | None, *, verbose: bool = True) -> Iterator[None]:
    """Hold an exclusive flock on the file `lock_path` (created; nothing when None). A file system without
    locks (some network mounts) gives no lock: every process computes, as without a cache."""
    if lock_path is None:
        yield
        return
    import fcntl

    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if verbose:
                print(f"data: waiting for the process that holds {lock_path} (it computes the lengths that "
                      "this one will read from the cache)", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            if verbose:
                print(f"data: no lock on {lock_path} ({e}); computing without it", file=sys.stderr)
        yield  # closing the file releases the lock
