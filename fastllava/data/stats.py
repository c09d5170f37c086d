"""Token-length statistics of a dataset (or a modelled profile), and how much padding each batching wastes.

    python -m fastllava.data.stats --data FILE [--data FILE ...] --tokenizer DIR [--template vicuna_v1]
                                   [--max-tokens 16384] [--model-max-length 2048] [--world-size 8]
    python -m fastllava.data.stats --profile mix665k [--n 100000]

Prints percentiles and a text histogram of the lengths (after image expansion and truncation), then:
  reference batching  LLaVA's LengthGroupedSampler with group_by_modality_length: megabatches of
                      world_size x 16 samples of one modality, sorted longest first, dealt to the rank
                      with the smallest total, each per-device batch of 16 right-padded to its longest;
                      efficiency = real tokens / padded tokens.
  packing             fastllava.data.packing.plan_packs (token budget --max-tokens) when importable,
                      else an inline first-fit-decreasing, labelled as such; efficiency = real tokens /
                      (packs x max_tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from .profile import PROFILES, sample_lengths


# ------------------------------------------------------------------------------- reference batching


def _even_chunks(order: list[int], weights: np.ndarray, num_chunks: int) -> list[list[int]]:
    """LLaVA's split_to_even_chunks: longest-first into the chunk with the smallest total; a full chunk
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


def _length_grouped(indices: np.ndarray, weights: np.ndarray, batch_size: int, world_size: int,
                    rng: np.random.Generator) -> list[list[int]]:
    """Megabatches (each a list of per-rank chunks) of one modality, like get_length_grouped_indices."""
    perm = indices[rng.permutation(len(indices))].tolist()
    mega = world_size * batch_size
    out = []
    for lo in range(0, len(perm), mega):
        block = sorted(perm[lo : lo + mega], key=lambda i: -weights[i])  # stable, like Python's sorted
        out.append(_even_chunks(block, weights, world_size))
    return out


def reference_batches(lengths: np.ndarray, has_image: np.ndarray, *, batch_size: int = 16, world_size: int = 1,
                      seed: int = 0, group_lengths: np.ndarray | None = None) -> list[np.ndarray]:
    """Per-device batches in the order LLaVA's modality-grouped length sampler yields them.

    lengths (n,) true token lengths; has_image (n,) bool; group_lengths (n,): what the sampler sorts by
    (LLaVA sorts by a word count of the conversation, not tokens; default: lengths).
    Returns a list of (<= batch_size,) index arrays: consecutive batch_size slices of the sampler's order.
    """
    weights = np.asarray(lengths if group_lengths is None else group_lengths, dtype=np.float64)
    rng = np.random.default_rng(seed)
    mm, lang = np.flatnonzero(has_image), np.flatnonzero(~np.asarray(has_image, dtype=bool))
    if len(mm) == 0 or len(lang) == 0:
        order = [i for mb in _length_grouped(np.arange(len(weights)), weights, batch_size, world_size, rng)
                 for chunk in mb for i in chunk]
    else:
        mm_mb = _length_grouped(mm, weights, batch_size, world_size, rng)
        lang_mb = _length_grouped(lang, weights, batch_size, world_size, rng)
        flat = lambda mb: [i for chunk in mb for i in chunk]  # noqa: E731
        # The last (partial) megabatch of each modality goes together at the end, sorted by index.
        tail = sorted(flat(mm_mb[-1]) + flat(lang_mb[-1]))
        body = mm_mb[:-1] + lang_mb[:-1]
        order = [i for k in rng.permutation(len(body)) for i in flat(body[k])] + tail
    order_n = np.asarray(order, dtype=np.int64)
    return [order_n[lo : lo + batch_size] for lo in range(0, len(order_n), batch_size)]


def padding_efficiency(lengths: np.ndarray, batches: Sequence[np.ndarray]) -> float:
    """Real tokens / tokens computed when each batch is right-padded to its longest sample."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return real / padded


# -------------------------------------------------------------------------------------------- packing


def first_fit_decreasing(lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    """Bins of <= max_tokens, longest sample first into the first bin it fits (the inline fallback)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable").tolist():
        need = int(lengths[i])
        for b, r in enumerate(room):
            if r >= need:
                bins[b].append(i)
                room[b] -= need
                break
        else:
            bins.append([i])
            room.append(max_tokens - need)
    return bins


def packing_efficiency(lengths: np.ndarray, max_tokens: int, seed: int = 0) -> tuple[float, int, str]:
    """(real tokens / (packs x max_tokens), number of packs, which planner)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    try:
        from .packing import plan_packs
    except ImportError:
        plan_packs = None
    if plan_packs is not None:
        packs = [p for p in plan_packs(lengths, max_tokens, seed=seed) if p]
        how = "fastllava.data.packing.plan_packs"
    else:
        packs = first_fit_decreasing(lengths, max_tokens)
        how = "inline first-fit-decreasing (fastllava.data.packing not importable)"
    return float(lengths.sum()) / (len(packs) * max_tokens), len(packs), how


# ------------------------------------------------------------------------------------------- printing


def describe(lengths: np.ndarray, name: str = "all", width: int = 50) -> str:
    """Percentiles and a text histogram of lengths (n,)."""
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return f"{name}: no samples"
    q = np.percentile(lengths, [0, 5, 25, 50, 75, 95, 99, 100])
    lines = [f"{name}: n={lengths.size} mean={lengths.mean():.1f} min={q[0]:.0f} p5={q[1]:.0f} p25={q[2]:.0f} "
             f"p50={q[3]:.0f} p75={q[4]:.0f} p95={q[5]:.0f} p99={q[6]:.0f} max={q[7]:.0f}"]
    edges = np.linspace(0, max(int(q[7]), 1) + 1, 17).round().astype(np.int64)
    hist, _ = np.histogram(lengths, bins=edges)
    for lo, hi, c in zip(edges[:-1], edges[1:], hist):
        bar = "#" * int(round(width * c / max(hist.max(), 1)))
        lines.append(f"  [{lo:6d}, {hi:6d}) {c:8d} {bar}")
    return "\n".join(lines)


def report(lengths: np.ndarray, has_image: np.ndarray, *, max_tokens: int, batch_size: int, world_size: int,
           seed: int = 0, group_lengths: np.ndarray | None = None) -> str:
    has_image = np.asarray(has_image, dtype=bool)
    out = [describe(lengths), describe(lengths[has_image], "with image"), describe(lengths[~has_image], "text-only")]
    batches = reference_batches(lengths, has_image, batch_size=batch_size, world_size=world_size, seed=seed,
                                group_lengths=group_lengths)
    ref = padding_efficiency(lengths, batches)
    by = "word counts, as LLaVA" if group_lengths is not None else "token lengths"
    out.append(f"reference batching (batch {batch_size}/device, {world_size} devices, grouped by {by}): "
               f"padding efficiency {ref:.1%} ({1 - ref:.1%} of computed tokens are padding)")
    if int(np.max(lengths)) <= max_tokens:
        eff, n_packs, how = packing_efficiency(lengths, max_tokens, seed)
        out.append(f"packing into {max_tokens}-token packs with {how}: {n_packs} packs, fill {eff:.1%}")
    else:
        out.append(f"packing: skipped, longest sample {int(np.max(lengths))} > --max-tokens {max_tokens}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastllava.data.stats", description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", help="dataset file (JSON list or JSONL); repeat for several")
    p.add_argument("--tokenizer", help="local tokenizer directory (with --data)")
    p.add_argument("--template", default="vicuna_v1")
    p.add_argument("--profile", choices=sorted(PROFILES), help="use a modelled profile instead of --data")
    p.add_argument("--n", type=int, default=None, help="profile: number of samples (default: full count)")
    p.add_argument("--max-tokens", type=int, default=16384, help="pack token budget")
    p.add_argument("--model-max-length", type=int, default=2048)
    p.add_argument("--num-image-tokens", type=int, default=576)
    p.add_argument("--batch-size", type=int, default=16, help="reference per-device batch")
    p.add_argument("--world-size", type=int, default=8, help="reference devices (megabatch = world x batch)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.profile is None) == (args.data is None):
        p.error("give exactly one of --data or --profile")
    group_lengths = None
    if args.profile:
        lengths, has_image = sample_lengths(args.profile, args.n, args.seed, args.num_image_tokens,
                                            args.model_max_length)
        print(f"profile {args.profile}: {len(lengths)} modelled samples")
    else:
        if not args.tokenizer:
            p.error("--data needs --tokenizer DIR")
        from .dataset import LlavaDataset

        # its own rejects file in the working directory: a training run's file next to the data stays intact
        rejects = os.path.basename(args.data[0]) + ".stats.rejects.jsonl"
        ds = LlavaDataset(args.data, None, args.tokenizer, args.template, num_image_tokens=args.num_image_tokens,
                          model_max_length=args.model_max_length, rejects_path=rejects)
        valid = ds.valid()
        lengths, has_image = ds.lengths()[valid], ds.has_image()[valid]
        # LLaVA's sampler groups by whitespace words of the conversation (+ nothing for the image).
        words = np.array([sum(len(t["value"].split()) for t in ds.records[int(i)]["conversations"])
                          for i in np.flatnonzero(valid)], dtype=np.int64)
        group_lengths = np.maximum(words, 1)
        print(f"{len(lengths)} usable samples ({ds.rejects.total} rejected, {ds.num_truncated} truncated "
              f"to {args.model_max_length})")
    if len(lengths) == 0:
        print("no samples", file=sys.stderr)
        return 1
    print(report(lengths, has_image, max_tokens=args.max_tokens, batch_size=args.batch_size,
                 world_size=args.world_size, seed=args.seed, group_lengths=group_lengths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
