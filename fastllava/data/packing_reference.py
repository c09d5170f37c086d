"""The plain-Python reference of the C++ packing planner (csrc/packing.cpp, `fastllava._packing`).

`shuffle`, `plan_epoch` and `pack_epoch` take the extension's arguments and return what it returns,
bit for bit: the same splitmix64 + Fisher-Yates, the same tie-breaks (tests/data/test_packing.py
compares them on random inputs). The planner runs this module where the extension is not built, or
with `backend="python"`; it is ~100x slower. What the planners do is in data/packing.py's docstring.

Legend: n samples; R ranks; M micro-steps of a step; a "bin" (or pack) is one rank's pack in one
micro-step. Lengths are checked by the caller (data/packing.py); the C++ code checks them itself.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
EPOCH_MUL = 0xD1B54A32D192ED03  # (epoch + 1) * EPOCH_MUL is xor-ed into the seed


def _fisher_yates(items: list, state: int) -> int:
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
    return (seed ^ (((epoch + 1) * EPOCH_MUL) & _MASK)) & _MASK


def shuffle(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's sample order, (n,) int64: Fisher-Yates over splitmix64, as `_packing.shuffle`."""
    order = list(range(n))
    _fisher_yates(order, _epoch_state(seed, epoch))
    return np.asarray(order, dtype=np.int64)


def _assign_lpt(sorted_lengths: list[int], nbins: int, max_tokens: int):
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


def _smallest_micro_steps(sorted_lengths: list[int], total: int, num_ranks: int, max_tokens: int):
    g = len(sorted_lengths)
    capacity = num_ranks * max_tokens
    upper = max(1, -(-g // num_ranks))
    lo, hi, step = 0, min(upper, max(1, -(-total // capacity))), 1
    while (fit := _assign_lpt(sorted_lengths, hi * num_ranks, max_tokens)) is None:
        lo, hi, step = hi, min(upper, hi + step), step * 2
    if hi - lo <= 1:
        return hi, fit
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if _assign_lpt(sorted_lengths, mid * num_ranks, max_tokens) is not None:
            hi = mid
        else:
            lo = mid
    return hi, _assign_lpt(sorted_lengths, hi * num_ranks, max_tokens)


def plan_epoch(lengths: np.ndarray, group_size: int, num_ranks: int, max_tokens: int, seed: int, epoch: int):
    """`_packing.plan_epoch` in Python: (samples[n], bin_offsets[nbins + 1], group_bins[ngroups + 1])."""
    lens = [int(x) for x in lengths]
    n = len(lens)
    order = shuffle(n, seed, epoch).tolist()
    samples: list[int] = []
    bin_offsets = [0]
    group_bins = [0]
    for start in range(0, n, group_size):
        members = order[start : start + group_size]
        pos = sorted(range(len(members)), key=lambda p: (-lens[members[p]], p))
        sorted_lengths = [lens[members[p]] for p in pos]
        m, (bin_of, load) = _smallest_micro_steps(sorted_lengths, sum(sorted_lengths), num_ranks, max_tokens)
        nbins = m * num_ranks
        slot_of = _snake_slots(load, num_ranks)
        bins: list[list[int]] = [[] for _ in range(nbins)]
        for k, p in enumerate(pos):
            bins[slot_of[bin_of[k]]].append(members[p])
        for b in bins:
            samples.extend(b)
            bin_offsets.append(len(samples))
        group_bins.append(group_bins[-1] + nbins)
    as_np = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return as_np(samples), as_np(bin_offsets), as_np(group_bins)


def _snake_slots(load: list[int], num_ranks: int) -> list[int]:
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


def _pack_window(lens: list[int], max_tokens: int) -> list[list[int]]:
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


def pack_epoch(lengths: np.ndarray, window: int, num_ranks: int, max_tokens: int, seed: int, epoch: int):
    """`_packing.pack_epoch` in Python: (samples[n], bin_offsets[nbins + 1]), nbins a multiple of R."""
    lens = [int(x) for x in lengths]
    n = len(lens)
    order = list(range(n))
    state = _fisher_yates(order, _epoch_state(seed, epoch))  # continues for the micro-step shuffles
    samples: list[int] = []
    bin_offsets = [0]
    for start in range(0, n, window):
        members = order[start : start + window]
        bins = _pack_window([lens[i] for i in members], max_tokens)
        micro = -(-len(bins) // num_ranks)
        bins += [[] for _ in range(micro * num_ranks - len(bins))]
        slot_of = _snake_slots([sum(lens[members[p]] for p in b) for b in bins], num_ranks)
        bin_at = [0] * len(bins)
        for b, slot in enumerate(slot_of):
            bin_at[slot] = b
        perm = list(range(micro))
        state = _fisher_yates(perm, state)
        for m in perm:
            for r in range(num_ranks):
                samples.extend(members[p] for p in bins[bin_at[m * num_ranks + r]])
                bin_offsets.append(len(samples))
    return np.asarray(samples, dtype=np.int64), np.asarray(bin_offsets, dtype=np.int64)
