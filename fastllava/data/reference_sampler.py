"""The reference's batching: LLaVA's modality-grouped length sampler, and the padding it computes.

LLaVA-1.5 trains with `group_by_modality_length`: the samples with an image and the text-only ones are
each shuffled, cut into megabatches of world_size x batch_size, sorted longest first inside a megabatch and
dealt to the rank with the smallest total (`split_to_even_chunks`); the full megabatches of both kinds are
shuffled together and the two partial last ones go, merged and sorted by index, at the end. The data
loader then hands consecutive `batch_size` slices of that order to the ranks in turn, and each per-device
batch is right-padded to its longest sample. This is the one implementation: the statistics tool, the
planner and the benchmarks all compare packing against it. Randomness is one seeded torch.Generator (LLaVA
draws from torch's RNG too).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _even_chunks(order: list[int], weights: np.ndarray, num_chunks: int) -> list[list[int]]:
    """LLaVA's split_to_even_chunks: longest first into the chunk with the smallest total; a full chunk
    takes no more. With a count not divisible by num_chunks it deals round-robin instead."""
    if len(order) % num_chunks:
        return [order[c::num_chunks] for c in range(num_chunks)]
    per_chunk = len(order) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for i in order:
        c = totals.index(min(totals))
        chunks[c].append(i)
        totals[c] += float(weights[i])
        if len(chunks[c]) == per_chunk:
            totals[c] = float("inf")
    return chunks


def _megabatches(indices: np.ndarray, weights: np.ndarray, megabatch: int, world_size: int,
                 generator: torch.Generator) -> list[list[int]]:
    """One modality's shuffled megabatches, each flattened chunk after chunk (LLaVA's get_length_grouped_indices)."""
    shuffled = indices[torch.randperm(len(indices), generator=generator).numpy()]
    out = []
    for lo in range(0, len(shuffled), megabatch):
        longest_first = sorted(shuffled[lo : lo + megabatch].tolist(), key=lambda i: -weights[i])
        out.append([i for chunk in _even_chunks(longest_first, weights, world_size) for i in chunk])
    return out


def reference_order(weights: Sequence[float], has_image: Sequence[bool], *, batch_size: int = 16,
                    world_size: int = 1, seed: int = 0) -> np.ndarray:
    """(n,) int64 sample order of LLaVA's LengthGroupedSampler with group_by_modality_length.

    weights (n,): what the sampler sorts by (LLaVA: a word count of the conversation; token lengths serve
    too); has_image (n,) bool.
    """
    weights = np.asarray(weights, dtype=np.float64)
    has_image = np.asarray(has_image, dtype=bool)
    generator = torch.Generator().manual_seed(seed)
    megabatch = world_size * batch_size
    kinds = [np.flatnonzero(has_image), np.flatnonzero(~has_image)]
    if any(len(k) == 0 for k in kinds):  # one modality only
        return np.asarray([i for mb in _megabatches(np.arange(len(weights)), weights, megabatch, world_size, generator)
                           for i in mb], dtype=np.int64)
    image_mb, text_mb = (_megabatches(k, weights, megabatch, world_size, generator) for k in kinds)
    body = image_mb[:-1] + text_mb[:-1]
    order = [i for k in torch.randperm(len(body), generator=generator).tolist() for i in body[k]]
    return np.asarray(order + sorted(image_mb[-1] + text_mb[-1]), dtype=np.int64)


def reference_batches(lengths: Sequence[int], has_image: Sequence[bool], *, batch_size: int = 16,
                      world_size: int = 1, seed: int = 0,
                      group_lengths: Sequence[float] | None = None) -> list[np.ndarray]:
    """Per-device batches in the order the reference trains them: consecutive `batch_size` slices of
    reference_order, rank r taking slices r, r + world_size, ... (so slices k*world .. (k+1)*world - 1 run
    as one step). group_lengths: what the sampler sorts by, default `lengths`."""
    weights = lengths if group_lengths is None else group_lengths
    order = reference_order(weights, has_image, batch_size=batch_size, world_size=world_size, seed=seed)
    return [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]


def padding_efficiency(lengths: Sequence[int], batches: Sequence[np.ndarray]) -> float:
    """Real tokens / tokens computed when each batch is right-padded to its longest sample."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return real / padded
