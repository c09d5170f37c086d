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

The planners run in C++ (`fastllava._packing`, csrc/packing.cpp). `_plan_epoch_py` and `_pack_epoch_py`
below are their plain-Python references, bit-identical (same splitmix64 + Fisher-Yates, same
tie-breaks); the tests compare them. Without the extension the references run, with a warning.

Legend: n samples; R ranks; M micro-steps of a step; a "bin" (or pack) is one rank's pack in one
micro-step.
"""

from __future__ import annotations

import bisect
import heapq
import warnings
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..batch import PackedBatch

try:
    from .. import _packing
except ImportError:  # not built (e.g. a plain source checkout); the reference stands in
    _packing = None

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_EPOCH_MUL = 0xD1B54A32D192ED03
_warned_fallback = False


# ----------------------------------------------------------------------------- Python reference


def _fisher_yates_py(items: list, state: int) -> int:
    """Shuffle `items` in place with Fisher-Yates over splitmix64 from `state`; returns the final state
    (the generator continues from there), as csrc/packing.cpp."""
    for i in range(len(items) - 1, 0, -1):
        state = (state + _GOLDEN) & _MASK
        z = state
        z = ((z ^ (z >> 30)) * _MIX1) & _MASK
        z = ((z ^ (z >> 27)) * _MIX2) & _MASK
        z ^= z >> 31
        j = z % (i + 1)
        items[i], items[j] = items[j], items[i]
    return state


def _epoch_state(seed: int, epoch: int) -> int:
    return (seed ^ (((epoch + 1) * _EPOCH_MUL) & _MASK)) & _MASK


def _shuffle_py(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's sample order: Fisher-Yates over splitmix64, as csrc/packing.cpp."""
    order = list(range(n))
    _fisher_yates_py(order, _epoch_state(seed, epoch))
    return order


def _assign_lpt_py(sorted_lengths: list[int], nbins: int, max_tokens: int):
    """(bin_of, load) placing each sample into the least-loaded bin, or None if one does not fit."""
    heap = [(0, b) for b in range(nbins)]  # (load, bin): already a heap
    load = [0] * nbins
    bin_of = []
    for length in sorted_lengths:
        cur, b = heap[0]
        if cur + length > max_tokens:
            return None
        load[b] = cur + length
        bin_of.append(b)
        heapq.heapreplace(heap, (cur + length, b))
    return bin_of, load


def _smallest_micro_steps_py(sorted_lengths: list[int], total: int, num_ranks: int, max_tokens: int):
    g = len(sorted_lengths)
    capacity = num_ranks * max_tokens
    upper = max(1, -(-g // num_ranks))
    lo, hi, step = 0, min(upper, max(1, -(-total // capacity))), 1
    while (fit := _assign_lpt_py(sorted_lengths, hi * num_ranks, max_tokens)) is None:
        lo, hi, step = hi, min(upper, hi + step), step * 2
    if hi - lo <= 1:
        return hi, fit
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if _assign_lpt_py(sorted_lengths, mid * num_ranks, max_tokens) is not None:
            hi = mid
        else:
            lo = mid
    return hi, _assign_lpt_py(sorted_lengths, hi * num_ranks, max_tokens)


def _plan_epoch_py(lengths: np.ndarray, group_size: int, num_ranks: int, max_tokens: int, seed: int, epoch: int):
    """Reference of `_packing.plan_epoch`: (samples[n], bin_offsets[nbins + 1], group_bins[ngroups + 1])."""
    lens = [int(x) for x in lengths]
    n = len(lens)
    order = _shuffle_py(n, seed, epoch)
    samples: list[int] = []
    bin_offsets = [0]
    group_bins = [0]
    for start in range(0, n, group_size):
        members = order[start : start + group_size]
        pos = sorted(range(len(members)), key=lambda p: (-lens[members[p]], p))
        sorted_lengths = [lens[members[p]] for p in pos]
        m, (bin_of, load) = _smallest_micro_steps_py(sorted_lengths, sum(sorted_lengths), num_ranks, max_tokens)
        nbins = m * num_ranks
        slot_of = _snake_slots_py(load, num_ranks)
        bins: list[list[int]] = [[] for _ in range(nbins)]
        for k, p in enumerate(pos):
            bins[slot_of[bin_of[k]]].append(members[p])
        for b in bins:
            samples.extend(b)
            bin_offsets.append(len(samples))
        group_bins.append(group_bins[-1] + nbins)
    as_np = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return as_np(samples), as_np(bin_offsets), as_np(group_bins)


def _snake_slots_py(load: list[int], num_ranks: int) -> list[int]:
    """bin -> output slot m*R + r: heaviest first, micro-step i's bins sorted positions i*R .. i*R+R-1,
    reversed on odd i."""
    slot_of = [0] * len(load)
    for s, b in enumerate(sorted(range(len(load)), key=lambda b: (-load[b], b))):
        micro, k = divmod(s, num_ranks)
        slot_of[b] = micro * num_ranks + (k if micro % 2 == 0 else num_ranks - 1 - k)
    return slot_of


# How many first members of a pair the gap-closing search tries (csrc/packing.cpp, kPairTries): on the
# 665K profile at 4096 tokens (100K samples, 8 ranks) 4, 16, 32 and 128 tries fill 99.66-99.73%.
_PAIR_TRIES = 16


def _pack_window_py(lens: list[int], max_tokens: int) -> list[list[int]]:
    """Reference of csrc/packing.cpp's pack_window: the window's bins as lists of positions p (lens[p] in
    shuffled order). Phase 1 takes samples in shuffled order while they leave a gap >= the window's
    mean length (or fill the bin exactly); phase 2 closes the gap by the best single length or the best
    pair found, repeated while anything fits. Equal lengths go earliest-first."""
    g = len(lens)
    lo = sum(lens) // g
    fifo: dict[int, deque[int]] = {}
    for p, x in enumerate(lens):
        fifo.setdefault(x, deque()).append(p)
    avail = sorted(fifo)  # lengths with an unused sample, ascending
    used = [False] * g
    bins: list[list[int]] = []

    def take(x: int, into: list[int]) -> int:
        p = fifo[x].popleft()
        used[p] = True
        into.append(p)
        if not fifo[x]:
            del avail[bisect.bisect_left(avail, x)]
        return x

    def largest_le(t: int) -> int:  # the largest available length <= t, or 0
        k = bisect.bisect_right(avail, t) - 1
        return avail[k] if k >= 0 else 0

    q, remaining = 0, g
    while remaining:
        pack: list[int] = []
        r = max_tokens
        while q < g:  # phase 1
            if used[q]:
                q += 1
                continue
            x = lens[q]
            if x != r and x + lo > r:
                break
            r -= take(x, pack)  # every earlier position is used, so q is the front of fifo[x]
            q += 1
        while avail and avail[0] <= r:  # phase 2
            single = largest_le(r)
            best, pair = single, None
            if best != r:
                k = bisect.bisect_right(avail, r - avail[0]) - 1
                tries = 0
                while k >= 0 and tries < _PAIR_TRIES and 2 * avail[k] > best:
                    first = avail[k]
                    k2 = bisect.bisect_right(avail, min(r - first, first)) - 1  # second <= first
                    if k2 == k and len(fifo[first]) < 2:
                        k2 -= 1
                    if k2 >= 0 and first + avail[k2] > best:
                        best, pair = first + avail[k2], (first, avail[k2])
                        if best == r:
                            break
                    k -= 1
                    tries += 1
            if pair is not None:
                r -= take(pair[0], pack)
                r -= take(pair[1], pack)
            else:
                r -= take(single, pack)
        remaining -= len(pack)
        bins.append(pack)
    return bins


def _pack_epoch_py(lengths: np.ndarray, window: int, num_ranks: int, max_tokens: int, seed: int, epoch: int):
    """Reference of `_packing.pack_epoch`: (samples[n], bin_offsets[nbins + 1]), nbins a multiple of R."""
    lens = [int(x) for x in lengths]
    n = len(lens)
    order = list(range(n))
    state = _fisher_yates_py(order, _epoch_state(seed, epoch))  # continues for the micro-step shuffles
    samples: list[int] = []
    bin_offsets = [0]
    for start in range(0, n, window):
        members = order[start : start + window]
        bins = _pack_window_py([lens[i] for i in members], max_tokens)
        micro = -(-len(bins) // num_ranks)
        bins += [[] for _ in range(micro * num_ranks - len(bins))]
        slot_of = _snake_slots_py([sum(lens[members[p]] for p in b) for b in bins], num_ranks)
        bin_at = [0] * len(bins)
        for b, slot in enumerate(slot_of):
            bin_at[slot] = b
        perm = list(range(micro))
        state = _fisher_yates_py(perm, state)
        for m in perm:
            for r in range(num_ranks):
                samples.extend(members[p] for p in bins[bin_at[m * num_ranks + r]])
                bin_offsets.append(len(samples))
    return np.asarray(samples, dtype=np.int64), np.asarray(bin_offsets, dtype=np.int64)


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


def _use_python(backend: str, seed: int, epoch: int) -> bool:
    """Whether the Python reference plans (checks the arguments both planners share)."""
    if backend not in ("auto", "cpp", "python"):
        raise ValueError(f"backend must be 'auto', 'cpp' or 'python', got {backend!r}")
    if not 0 <= seed <= _MASK or epoch < 0:
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
    return backend == "python" or _packing is None


def _plan_epoch(lengths: np.ndarray, group_size: int, num_ranks: int, max_tokens: int, seed: int, epoch: int,
                backend: str):
    if group_size < 1 or num_ranks < 1:
        raise ValueError(f"group size and num_ranks must be >= 1, got {group_size} and {num_ranks}")
    if _use_python(backend, seed, epoch):
        return _plan_epoch_py(lengths, group_size, num_ranks, max_tokens, seed, epoch)
    return _packing.plan_epoch(lengths, group_size, num_ranks, max_tokens, seed, epoch)


def _pack_epoch(lengths: np.ndarray, window: int, num_ranks: int, max_tokens: int, seed: int, epoch: int,
                backend: str):
    if window < 1 or num_ranks < 1:
        raise ValueError(f"shuffle_buffer and num_ranks must be >= 1, got {window} and {num_ranks}")
    if _use_python(backend, seed, epoch):
        return _pack_epoch_py(lengths, window, num_ranks, max_tokens, seed, epoch)
    return _packing.pack_epoch(lengths, window, num_ranks, max_tokens, seed, epoch)


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
    samples: Sequence[dict | None], image_token_id: int, num_image_tokens: int
) -> tuple[PackedBatch | None, int]:
    """Pack one bin's samples. None entries are samples the dataset rejected; they are skipped and
    counted. Returns (batch, num_rejected); batch is None when nothing is left (the rank must still
    join the micro-step's collectives)."""
    kept = [s for s in samples if s is not None]
    rejected = len(samples) - len(kept)
    if not kept:
        return None, rejected
    return PackedBatch.from_samples(kept, image_token_id=image_token_id, num_image_tokens=num_image_tokens), rejected


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
