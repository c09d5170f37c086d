"""The memory plan against the device: the fake-tensor estimate of a rank's peak (what
`python -m fastllava.plan --memory` prints) beside the same optimizer step run on real tensors, measured
by torch's FSDPMemTracker and, on a GPU, by torch.cuda.max_memory_allocated.

Both runs are fastllava/memplan.py's `estimate_memory` (one steady-state step: a micro-step on a full
pack, then clipping + AdamW), over the same fake process group of `--world` ranks, so one GPU measures
one rank of an 8-GPU run (collectives move no data: values are garbage, allocations are the real ones).
The real run uses the kernels `auto` picks (Triton on CUDA); the estimate, their fake implementations.
What the estimate leaves out (the CUDA context, cuBLAS workspaces, allocator fragmentation) is what
max_memory_allocated - estimate shows; the plan's margin must cover it.

    python benchmarks/bench_memory.py --shape 7b --layers 4              # on a GPU (gpu_suite.sh)
    python benchmarks/bench_memory.py --shape tiny --device cpu          # smoke run: tracker vs estimate
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from fastllava.memplan import GiB, estimate_memory, fake_process_group
from fastllava.model import Backends
from fastllava.plan import recipe_config
from fastllava.testing import TORCH_BACKENDS, tiny_config


def measure(config, stage: str, tokens: int, checkpointing: str, world: int, device: str) -> dict:
    """Estimate (fake) and measurement (real tensors on `device`) of one configuration, in bytes."""
    with fake_process_group(world):
        # On the CPU the real run takes the torch ops: the estimate takes them too, to compare like with like.
        est, = estimate_memory(config, stage, [tokens], checkpointing, world=world,
                               backends=TORCH_BACKENDS if device == "cpu" else None)
        real, = estimate_memory(config, stage, [tokens], checkpointing, world=world, fake=False, device=device,
                                backends=Backends() if device != "cpu" else None)
    row = {"stage": stage, "pack_tokens": tokens, "checkpointing": checkpointing, "world": world,
           "estimate": est.peak, "tracker": real.peak, "estimate_phase": est.phase, "cuda_max_allocated": real.cuda_peak}
    if device != "cpu":
        del real
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "7b", "13b"], default="7b")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (the plan extrapolates in depth)")
    parser.add_argument("--world", type=int, default=8, help="ranks of the fake process group")
    parser.add_argument("--pack-tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--checkpointing", nargs="+", default=["none", "selective"],
                        choices=["none", "selective", "full"])
    parser.add_argument("--stages", nargs="+", default=["align", "finetune"], choices=["align", "finetune"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (use --device cpu for the smoke run)")
    if args.shape == "tiny":
        config = tiny_config()
        args.pack_tokens = sorted({min(t, 256) for t in args.pack_tokens})
    else:
        config = recipe_config(f"llava-1.5-{args.shape}")
        config = replace(config, text=replace(config.text, num_hidden_layers=args.layers))
    rows = [measure(config, stage, t, mode, args.world, args.device)
            for stage in args.stages for mode in args.checkpointing for t in args.pack_tokens]
    unit, size = ("MiB", 2**20) if args.shape == "tiny" else ("GiB", GiB)
    layers = config.text.num_hidden_layers
    print(f"{args.shape} shape, {layers} decoder layers, one rank of {args.world}, device {args.device}\n")
    print(f"| stage | pack tokens | checkpointing | estimate {unit} | tracker (real) {unit} "
          f"| cuda max allocated {unit} | real / estimate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cuda = r["cuda_max_allocated"]
        real = cuda if cuda is not None else r["tracker"]
        print(f"| {r['stage']} | {r['pack_tokens']} | {r['checkpointing']} | {r['estimate'] / size:.2f} "
              f"| {r['tracker'] / size:.2f} | {'n/a' if cuda is None else f'{cuda / size:.2f}'} "
              f"| {real / r['estimate']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
