"""Token-length statistics of a dataset (or a modelled profile), and how much padding each batching wastes.

    python -m fastllava.data.stats --data FILE [--data FILE ...] --tokenizer DIR [--template vicuna_v1]
                                   [--max-tokens 16384] [--model-max-length 2048] [--world-size 8]
    python -m fastllava.data.stats --profile mix665k [--n 100000]

Prints percentiles and a text histogram of the lengths (after image expansion and truncation), then:
  reference batching  LLaVA's LengthGroupedSampler with group_by_modality_length (data/reference_sampler.py),
                      each per-device batch of 16 right-padded to its longest;
                      efficiency = real tokens / padded tokens.
  packing             fastllava.data.packing.plan_packs (token budget --max-tokens);
                      efficiency = real tokens / (packs x max_tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from .packing import plan_packs
from .profile import PROFILES, sample_lengths
from .reference_sampler import padding_efficiency, reference_batches
from .templates import TEMPLATES


def packing_efficiency(lengths: np.ndarray, max_tokens: int, seed: int = 0) -> tuple[float, int]:
    """(real tokens / (packs x max_tokens), number of packs) of token-budget packing (plan_packs)."""
    plan = plan_packs(np.asarray(lengths, dtype=np.int64), max_tokens, seed=seed)  # one rank: no empty packs
    return plan.fill_ratio, plan.num_packs


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
    """The tool's report: length statistics, the reference's padding efficiency and packing's fill."""
    has_image = np.asarray(has_image, dtype=bool)
    out = [describe(lengths), describe(lengths[has_image], "with image"), describe(lengths[~has_image], "text-only")]
    batches = reference_batches(lengths, has_image, batch_size=batch_size, world_size=world_size, seed=seed,
                                group_lengths=group_lengths)
    ref = padding_efficiency(lengths, batches)
    by = "word counts, as LLaVA" if group_lengths is not None else "token lengths"
    out.append(f"reference batching (batch {batch_size}/device, {world_size} devices, grouped by {by}): "
               f"padding efficiency {ref:.1%} ({1 - ref:.1%} of computed tokens are padding)")
    if int(np.max(lengths)) <= max_tokens:
        eff, n_packs = packing_efficiency(lengths, max_tokens, seed)
        out.append(f"packing into {max_tokens}-token packs with plan_packs: {n_packs} packs, fill {eff:.1%}")
    else:
        out.append(f"packing: skipped, longest sample {int(np.max(lengths))} > --max-tokens {max_tokens}")
    return "\n".join(out)


def _dataset_lengths(args):
    """(lengths, has_image, word counts) of the usable samples of --data."""
    from .dataset import LlavaDataset

    # its own rejects file in the working directory: a training run's file next to the data stays intact
    rejects = os.path.basename(args.data[0]) + ".stats.rejects.jsonl"
    ds = LlavaDataset(args.data, None, args.tokenizer, args.template, num_image_tokens=args.num_image_tokens,
                      model_max_length=args.model_max_length, rejects_path=rejects)
    valid = ds.valid()
    # LLaVA's sampler groups by whitespace words of the conversation (+ nothing for the image).
    words = np.array([sum(len(t["value"].split()) for t in ds.records[int(i)]["conversations"])
                      for i in np.flatnonzero(valid)], dtype=np.int64)
    print(f"{int(valid.sum())} usable samples ({ds.rejects.total} rejected, {ds.num_truncated} truncated "
          f"to {args.model_max_length})")
    return ds.lengths()[valid], ds.has_image()[valid], np.maximum(words, 1)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m fastllava.data.stats", description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", help="dataset file (JSON list or JSONL); repeat for several")
    p.add_argument("--tokenizer", help="local tokenizer directory (with --data)")
    p.add_argument("--template", default="vicuna_v1", choices=sorted(TEMPLATES),
                   help="the template the lengths are tokenized in (default vicuna_v1)")
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
    elif not args.tokenizer:
        p.error("--data needs --tokenizer DIR")
    else:
        try:
            lengths, has_image, group_lengths = _dataset_lengths(args)
        except ValueError as e:  # a missing file or tokenizer, malformed JSON: say which, no traceback
            p.error(str(e))
    if len(lengths) == 0:
        print("no samples", file=sys.stderr)
        return 1
    print(report(lengths, has_image, max_tokens=args.max_tokens, batch_size=args.batch_size,
                 world_size=args.world_size, seed=args.seed, group_lengths=group_lengths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
