"""Packing efficiency and planner speed on a 665K-like length profile.

Compares, on the same modelled lengths (fastllava.data.profile.sample_lengths):
  reference: LLaVA's batching (modality-grouped megabatches of world x 16 samples sorted by length,
             dealt to ranks by smallest total, each per-device batch of 16 right-padded to its longest);
  steps:     our default, 128-sample optimizer steps over R ranks x M micro-steps (plan_steps);
  packs:     token-budget packing (plan_packs) for several shuffle windows, beside the longest-processing-
             time packing that plan_packs used before (`LPT fill`, plan_steps' assignment over the window).
Efficiency = real tokens / computed tokens. For varlen packs nothing is padded; what remains is the
wait for the slowest rank of each micro-step ("effective"), and, for static shapes, the unused budget
("fill"). Times are min-max over 3 runs (the machine may be shared). Planner speed: C++ and the Python
references on all 665K samples.

  python benchmarks/bench_packing.py [--profile mix665k] [--world 8] [--skip-python]
"""

from __future__ import annotations

import argparse
import time

import torch

from fastllava.data import packing, packing_reference

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
    """(min, max) seconds over `repeat` calls, and the last result."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return (min(times), max(times)), out


def _ms(t) -> str:
    return f"{t[0] * 1e3:.0f}-{t[1] * 1e3:.0f} ms"


def _lpt_fill(lengths, window, world, max_tokens) -> float:
    """Fill of the former plan_packs: plan_steps' smallest-M longest-processing-time over each window."""
    _, offsets, _ = packing._plan_epoch(lengths, window, world, max_tokens, 0, 0, "auto")
    return float(lengths.sum() / ((len(offsets) - 1) * max_tokens))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="mix665k", choices=["mix665k", "pretrain558k"])
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--per-device", type=int, default=16)
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--skip-python", action="store_true", help="skip timing the Python references (~10 s)")
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

    print(f"\ntoken-budget packs (plan_packs, {args.world} ranks), real tokens / pack capacity; the reference "
          f"sampler computes {ref['padding_efficiency']:.1%} real tokens:")
    print(f"{'max_tokens':>10} {'buffer':>8} {'packs':>7} {'fill':>7} {'micro-bal':>9} {'LPT fill':>8} {'time':>14}")
    for max_tokens in (4096, 16384):
        for buffer in (512, 2048, 16384, len(lengths)):
            t, plan = _time(lambda m=max_tokens, b=buffer: packing.plan_packs(lengths, m, args.world, shuffle_buffer=b))
            print(f"{max_tokens:>10} {buffer:>8} {plan.num_packs:>7} {plan.fill_ratio:>7.2%} {plan.micro_balance:>9.4f} "
                  f"{_lpt_fill(lengths, buffer, args.world, max_tokens):>8.2%} {_ms(t):>14}")

    print(f"\nplanner speed, {len(lengths)} samples, {args.world} ranks:")
    if packing._packing is not None:
        t_core, _ = _time(lambda: packing._packing.plan_epoch(lengths, args.global_batch, args.world, 16384, 0, 0))
        t_steps, _ = _time(lambda: packing.plan_steps(lengths, args.global_batch, 16384, args.world, backend="cpp"))
        t_pcore, _ = _time(lambda: packing._packing.pack_epoch(lengths, 16384, args.world, 4096, 0, 0))
        t_packs, plan = _time(lambda: packing.plan_packs(lengths, 4096, args.world, backend="cpp"))
        print(f"  plan_steps ({args.global_batch} samples, 16384 tokens): C++ core {_ms(t_core)}; "
              f"with StepPlan objects {_ms(t_steps)}")
        print(f"  plan_packs (4096 tokens, window 16384): C++ core {_ms(t_pcore)}; with PackPlan {_ms(t_packs)}; "
              f"fill {plan.fill_ratio:.2%} against the reference sampler's {ref['padding_efficiency']:.1%} real tokens")
    else:
        print("  C++ extension not built (pip install -e .)")
    if not args.skip_python:
        t_py, _ = _time(lambda: packing_reference.plan_epoch(lengths, args.global_batch, args.world, 16384, 0, 0), repeat=1)
        t_ppy, _ = _time(lambda: packing_reference.pack_epoch(lengths, 16384, args.world, 4096, 0, 0), repeat=1)
        print(f"  Python references: plan_steps core {t_py[0] * 1e3:.0f} ms, plan_packs core {t_ppy[0] * 1e3:.0f} ms")

if __name__ == "__main__":
    main()
