"""Packing efficiency and planner speed on a 665K-like length profile.

Compares, on the same modelled lengths (fastllava.data.profile.sample_lengths):
  reference: LLaVA's batching (modality-grouped megabatches of world x 16 samples sorted by length,
             dealt to ranks by smallest total, each per-device batch of 16 right-padded to its longest);
  steps:     our default, 128-sample optimizer steps over R ranks x M micro-steps (plan_steps);
  packs:     token-budget packing (plan_packs) for several shuffle windows.
Efficiency = real tokens / computed tokens. For varlen packs nothing is padded; what remains is the
wait for the slowest rank of each micro-step ("effective"), and, for static shapes, the unused budget
("fill"). Planner speed: C++ and the Python reference on all 665K samples.

  python benchmarks/bench_packing.py [--profile mix665k] [--world 8] [--skip-python]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fastllava.data import packing

from fastllava.data.profile import sample_lengths
from fastllava.data.reference_sampler import reference_batches


def reference_efficiency(lengths, has_image, world: int, per_device: int) -> dict:
    """Padding and rank waiting of LLaVA's batching (fastllava.data.reference_sampler): the per-device batches
    of one step are `world` consecutive ones."""
    batches = [b.tolist() for b in reference_batches(lengths, has_image, batch_size=per_device, world_size=world)]
    real = padded = waited = 0
    for step in (batches[i : i + world] for i in range(0, len(batches), world)):
        per_rank = [len(b) * int(lengths[b].max()) if b else 0 for b in step]
        real += sum(int(lengths[b].sum()) for b in step if b)
        padded += sum(per_rank)
        waited += max(per_rank) * len(step)
    return {"padding_efficiency": real / padded, "effective_efficiency": real / waited}


def _time(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="mix665k", choices=["mix665k", "pretrain558k"])
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--per-device", type=int, default=16)
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--skip-python", action="store_true", help="skip timing the Python reference (~5 s)")
    args = ap.parse_args()
    print(f"device: {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'} "
          "(planning runs on the host either way)")
    lengths, has_image = sample_lengths(args.profile)
    print(f"profile {args.profile}: {len(lengths)} samples, {has_image.mean():.1%} with image, "
          f"mean {lengths.mean():.0f} / max {lengths.max()} tokens")

    ref = reference_efficiency(lengths, has_image, args.world, args.per_device)
    print(f"\nreference ({args.world} ranks x batch {args.per_device}, padded): real/computed "
          f"{ref['padding_efficiency']:.1%}, with rank waiting {ref['effective_efficiency']:.1%}")

    print(f"\nsteps of {args.global_batch} samples over {args.world} ranks (varlen, no padding):")
    print(f"{'max_tokens':>10} {'M mean':>7} {'balance':>8} {'min':>6} {'micro-bal':>9} {'effective':>9} {'fill':>6}")
    for max_tokens in (4096, 8192, 16384, 32768):
        s = packing.plan_stats(packing.plan_steps(lengths, args.global_batch, max_tokens, args.world, seed=0))
        print(f"{max_tokens:>10} {s['micro_steps_mean']:>7.2f} {s['balance_mean']:>8.4f} {s['balance_min']:>6.3f} "
              f"{s['micro_balance_mean']:>9.4f} {s['effective_efficiency']:>9.2%} {s['fill_ratio']:>6.1%}")

    print(f"\ntoken-budget packs (plan_packs, {args.world} ranks), real tokens / pack capacity:")
    print(f"{'max_tokens':>10} {'buffer':>8} {'packs':>7} {'fill':>7} {'micro-bal':>9}")
    for max_tokens in (4096, 16384):
        for buffer in (2048, 16384, len(lengths)):
            packs = packing.plan_packs(lengths, max_tokens, args.world, seed=0, shuffle_buffer=buffer)
            loads = np.array([lengths[p].sum() for p in packs]).reshape(-1, args.world)
            bal = np.mean(loads.mean(1) / loads.max(1))
            print(f"{max_tokens:>10} {buffer:>8} {len(packs):>7} {loads.sum() / (loads.size * max_tokens):>7.2%} {bal:>9.4f}")

    print(f"\nplanner speed, {len(lengths)} samples, global batch {args.global_batch}, {args.world} ranks, 16384 tokens:")
    if packing._packing is not None:
        t_core, _ = _time(lambda: packing._packing.plan_epoch(lengths, args.global_batch, args.world, 16384, 0, 0))
        t_steps, _ = _time(lambda: packing.plan_steps(lengths, args.global_batch, 16384, args.world, backend="cpp"))
        t_packs, _ = _time(lambda: packing.plan_packs(lengths, 16384, args.world, shuffle_buffer=16384, backend="cpp"))
        print(f"  C++ core {t_core * 1e3:.0f} ms; plan_steps (with StepPlan objects) {t_steps * 1e3:.0f} ms; "
              f"plan_packs {t_packs * 1e3:.0f} ms")
    else:
        print("  C++ extension not built (pip install -e .)")
    if not args.skip_python:
        t_py, _ = _time(lambda: packing._plan_epoch_py(lengths, args.global_batch, args.world, 16384, 0, 0), repeat=1)
        print(f"  Python reference core {t_py * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
