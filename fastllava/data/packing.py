"""Sequence packing: which samples go into which pack, on which rank, in which optimizer step.

Default semantics (docs/data.md, "Images and packing"): an optimizer step is a fixed number of
samples (`global_batch`, the paper's 256 / 128), one epoch is every sample exactly once. Per epoch the
sample order is shuffled from (seed, epoch); the order is cut into steps of `global_batch` samples; a
step's samples are spread over R ranks x M micro-steps, M the smallest count for which every bin holds
<= `max_tokens` tokens, by longest-processing-time so that ranks carry nearly equal tokens (`plan_steps`).

`plan_packs` packs by token budget instead, for the statistics tool and the packing benchmark: the same
shuffle, cut into windows of `shuffle_buffer` samples; inside a window each pack takes samples in
shuffled order until the gap left is under the window's mean length, and then closes it by best fit
(one or two of the window's samples chosen by length). The packs are dealt to ranks by load and the
window's micro-steps shuffled. It returns a `PackPlan` of flat arrays (samples + pack offsets).

The planners run in C++ (`fastllava._packing`, csrc/packing.cpp). data/packing_reference.py is their
plain-Python reference, bit-identical (same splitmix64 + Fisher-Yates, same tie-breaks); the tests
compare them. Without the extension the reference runs, with a warning.

Legend: n samples; R ranks; M micro-steps of a step; a "bin" (or pack) is one rank's pack in one
micro-step.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..batch import PackedBatch
from . import packing_reference

try:
    from .. import _packing
except ImportError:  # not built (e.g. a plain source checkout); the reference stands in
    _packing = None

_warned_fallback = False


# ----------------------------------------------------------------------------- dispatch


def _check_lengths(lengths: Sequence[int] | np.ndarray, max_tokens: int) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be a 1-D sequence of integers, got shape {lengths.shape}, dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    over = np.flatnonzero(lengths > max_tokens)
    if over.size:
        i = int(over[0])
        raise ValueError(
            f"sample {i} has {int(lengths[i])} tokens, more than max_tokens={max_tokens} "
            f"({over.size} sample(s) too long); truncate in the dataset or raise max_tokens"
        )
    empty = np.flatnonzero(lengths < 1)
    if empty.size:
        i = int(empty[0])
        raise ValueError(f"sample {i} has length {int(lengths[i])}; every sample needs at least one token")
    return lengths


def _planner(backend: str, seed: int, epoch: int):
    """The module that plans, `_packing` or `packing_reference` (checks the arguments both share)."""
    if backend not in ("auto", "cpp", "python"):
        raise ValueError(f"backend must be 'auto', 'cpp' or 'python', got {backend!r}")
    if not 0 <= seed < 2**64 or epoch < 0:
        raise ValueError(f"seed must be in [0, 2**64) and epoch >= 0, got seed={seed}, epoch={epoch}")
    if backend == "cpp" and _packing is None:
        raise ValueError("backend='cpp' but fastllava._packing is not built; run `pip install -e .`")
    if backend == "auto" and _packing is None:
        global _warned_fallback
        if not _warned_fallback:
            warnings.warn(
                "fastllava._packing (C++) is not built; planning in Python, ~100x slower. "
                "Build it with `pip install -e .`",
                stacklevel=4,
            )
            _warned_fallback = True
    return packing_reference if backend == "python" or _packing is None else _packing


def _plan_epoch(lengths: np.ndarray, group_size: int, num_ranks: int, max_tokens: int, seed: int, epoch: int,
                backend: str):
    if group_size < 1 or num_ranks < 1:
        raise ValueError(f"group size and num_ranks must be >= 1, got {group_size} and {num_ranks}")
    return _planner(backend, seed, epoch).plan_epoch(lengths, group_size, num_ranks, max_tokens, seed, epoch)


def _pack_epoch(lengths: np.ndarray, window: int, num_ranks: int, max_tokens: int, seed: int, epoch: int,
                backend: str):
    if window < 1 or num_ranks < 1:
        raise ValueError(f"shuffle_buffer and num_ranks must be >= 1, got {window} and {num_ranks}")
    return _planner(backend, seed, epoch).pack_epoch(lengths, window, num_ranks, max_tokens, seed, epoch)


# ----------------------------------------------------------------------------- public API


@dataclass
class StepPlan:
    """One optimizer step: micro_batches[m][r] are the sample indices rank r packs at micro-step m."""

    epoch: int
    index: int  # step within the epoch
    micro_batches: list[list[list[int]]]  # [M][R] -> sample indices; a bin may be empty in a short last step
    tokens: np.ndarray  # (M, R) int64 real tokens per bin
    max_tokens: int

    @property
    def num_micro_steps(self) -> int:
        """M, the same on every rank."""
        return len(self.micro_batches)

    @property
    def num_samples(self) -> int:
        """Samples of the step over all ranks and micro-steps."""
        return sum(len(b) for micro in self.micro_batches for b in micro)

    def rank(self, r: int) -> list[list[int]]:
        """Rank r's packs, one per micro-step (every rank runs the same number)."""
        return [micro[r] for micro in self.micro_batches]

    @property
    def balance(self) -> float:
        """Mean rank tokens / max rank tokens over the step (1.0 = no rank waits)."""
        per_rank = self.tokens.sum(axis=0)
        return float(per_rank.mean() / per_rank.max()) if per_rank.max() > 0 else 1.0

    @property
    def micro_balance(self) -> float:
        """Mean over micro-steps of mean bin tokens / max bin tokens: ranks sync at every micro-step."""
        top = self.tokens.max(axis=1)
        return float(np.mean(self.tokens.mean(axis=1) / np.maximum(top, 1)))

    @property
    def fill_ratio(self) -> float:
        """Real tokens / (R * M * max_tokens): the waste if every pack were padded to the budget."""
        return float(self.tokens.sum() / (self.tokens.size * self.max_tokens))


@dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous; compare .samples and .offsets
class PackPlan:
    """Token-budget packs of one epoch (plan_packs), as flat arrays.

    Pack i is samples[offsets[i]:offsets[i + 1]]; it goes to rank i % num_ranks at micro-step
    i // num_ranks, so num_packs is a multiple of num_ranks (a pack is empty only where a window ran
    out of samples for a micro-step's ranks).
    """

    samples: np.ndarray  # (n,) int64 sample indices, pack after pack; every sample exactly once
    offsets: np.ndarray  # (num_packs + 1,) int64
    tokens: np.ndarray  # (num_packs,) int64 real tokens per pack, each <= max_tokens
    num_ranks: int
    max_tokens: int

    @property
    def num_packs(self) -> int:
        return len(self.offsets) - 1

    def pack(self, i: int) -> np.ndarray:
        """The sample indices of pack i (a view)."""
        return self.samples[self.offsets[i] : self.offsets[i + 1]]

    @property
    def fill_ratio(self) -> float:
        """Real tokens / (num_packs * max_tokens): the waste if every pack were padded to the budget."""
        return float(self.tokens.sum() / (self.num_packs * self.max_tokens)) if self.num_packs else 0.0

    @property
    def micro_balance(self) -> float:
        """Mean over micro-steps of mean pack tokens / max pack tokens: ranks sync at every micro-step."""
        if not self.num_packs:
            return 1.0
        per_micro = self.tokens.reshape(-1, self.num_ranks)
        return float(np.mean(per_micro.mean(axis=1) / np.maximum(per_micro.max(axis=1), 1)))


def _bins_to_lists(samples: np.ndarray, bin_offsets: np.ndarray) -> list[list[int]]:
    flat = samples.tolist()
    offs = bin_offsets.tolist()
    return [flat[offs[b] : offs[b + 1]] for b in range(len(offs) - 1)]


def plan_packs(
    lengths: Sequence[int] | np.ndarray,
    max_tokens: int,
    num_ranks: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 16384,
    *,
    epoch: int = 0,
    backend: str = "auto",
) -> PackPlan:
    """Token-budget packing of one epoch: every sample exactly once, each pack <= max_tokens tokens.

    lengths: (n,) int, tokens per sample (images counted as their placeholder tokens).
    Packs are formed inside windows of `shuffle_buffer` shuffled samples: a pack takes samples in
    shuffled order and closes its last gap by best fit from its window, so a bigger window has more
    lengths to close with (665K profile, 4096 tokens, 8 ranks: 97.1% fill at 512, 99.7% at the default;
    docs/data.md) but mixes samples over a longer stretch of the epoch. Each consecutive group of
    num_ranks packs is one micro-step across ranks, dealt by load so ranks wait little; see PackPlan.
    """
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    lengths = _check_lengths(lengths, max_tokens)
    samples, offsets = _pack_epoch(lengths, shuffle_buffer, num_ranks, max_tokens, seed, epoch, backend)
    return PackPlan(samples, offsets, _bin_tokens(lengths, samples, offsets), num_ranks, max_tokens)


def plan_steps(
    lengths: Sequence[int] | np.ndarray,
    global_batch: int,
    max_tokens: int,
    num_ranks: int = 1,
    seed: int = 0,
    *,
    epoch: int = 0,
    backend: str = "auto",
) -> list[StepPlan]:
    """The epoch's optimizer steps, each of `global_batch` samples (the last may hold fewer)."""
    lengths = _check_lengths(lengths, max_tokens)
    samples, bin_offsets, group_bins = _plan_epoch(lengths, global_batch, num_ranks, max_tokens, seed, epoch, backend)
    bins = _bins_to_lists(samples, bin_offsets)
    return _group_steps(bins, _bin_tokens(lengths, samples, bin_offsets), group_bins.tolist(), num_ranks,
                        max_tokens, epoch)


def _bin_tokens(lengths: np.ndarray, samples: np.ndarray, bin_offsets: np.ndarray) -> np.ndarray:
    cumulative = np.concatenate([[0], np.cumsum(lengths[samples])])
    return cumulative[bin_offsets[1:]] - cumulative[bin_offsets[:-1]]


def _group_steps(bins, bin_tokens, group_bins, num_ranks, max_tokens, epoch) -> list[StepPlan]:
    steps = []
    for s in range(len(group_bins) - 1):
        lo, hi = group_bins[s], group_bins[s + 1]
        micro = [bins[b : b + num_ranks] for b in range(lo, hi, num_ranks)]
        tokens = np.asarray(bin_tokens[lo:hi], dtype=np.int64).reshape(-1, num_ranks)
        steps.append(StepPlan(epoch, s, micro, tokens, max_tokens))
    return steps


class PackingPlanner:
    """The step plans of every epoch for one dataset, batch size and rank count: a pure function of them.

    `plan_epoch(e)` is cached for the epoch last asked for. The planner holds no position: where a run is
    lives in the loader (data/loader.py), which saves `fingerprint()` with it so that a resume refuses a
    changed plan.
    """

    def __init__(self, lengths, max_tokens: int, *, global_batch: int, num_ranks: int = 1, seed: int = 0,
                 backend: str = "auto"):
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        self.lengths = _check_lengths(lengths, max_tokens)
        self.max_tokens, self.num_ranks, self.seed = max_tokens, num_ranks, seed
        self.global_batch, self.backend = global_batch, backend
        self._cache: tuple[int, list[StepPlan]] | None = None

    def plan_epoch(self, epoch: int) -> list[StepPlan]:
        """The optimizer steps of `epoch`, in order."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, plan_steps(self.lengths, self.global_batch, self.max_tokens, self.num_ranks,
                                             self.seed, epoch=epoch, backend=self.backend))
        return self._cache[1]

    def fingerprint(self) -> dict:
        """What the plans depend on (JSON-able)."""
        return {
            "num_samples": int(self.lengths.size),
            "lengths_crc32": zlib.crc32(self.lengths.tobytes()),
            "max_tokens": self.max_tokens,
            "num_ranks": self.num_ranks,
            "seed": self.seed,
            "global_batch": self.global_batch,
        }

    def check(self, saved: dict) -> None:
        """Raise ValueError if `saved` (an earlier fingerprint()) would give other plans than this planner."""
        for key, value in self.fingerprint().items():
            if saved.get(key) != value:
                raise ValueError(f"the data plan was saved with {key}={saved.get(key)!r}, this run has {value!r}; "
                                 "resuming would change which samples the remaining steps see")


def collate_pack(
    samples: Sequence[dict | None], image_token_id: int, num_image_tokens: int, anyres=None
) -> tuple[PackedBatch | None, int]:
    """Pack one bin's samples. None entries are samples the dataset rejected; they are skipped and
    counted. Returns (batch, num_rejected); batch is None when nothing is left (the rank must still
    join the micro-step's collectives). anyres: the model's AnyResGrid (PackedBatch.from_samples)."""
    kept = [s for s in samples if s is not None]
    rejected = len(samples) - len(kept)
    if not kept:
        return None, rejected
    return PackedBatch.from_samples(kept, image_token_id=image_token_id, num_image_tokens=num_image_tokens,
                                    anyres=anyres), rejected


def plan_stats(steps: Sequence[StepPlan]) -> dict:
    """Aggregates over steps. `effective_efficiency` = real tokens / tokens the slowest rank of each
    micro-step makes every rank wait for (varlen compute, no padding)."""
    real = sum(int(s.tokens.sum()) for s in steps)
    waited = sum(int(s.tokens.max(axis=1).sum()) * s.tokens.shape[1] for s in steps)
    budget = sum(s.tokens.size * s.max_tokens for s in steps)
    return {
        "steps": len(steps),
        "micro_steps_mean": float(np.mean([s.num_micro_steps for s in steps])),
        "balance_mean": float(np.mean([s.balance for s in steps])),
        "balance_min": float(np.min([s.balance for s in steps])),
        "micro_balance_mean": float(np.mean([s.micro_balance for s in steps])),
        "fill_ratio": real / budget,
        "effective_efficiency": real / waited,
    }
