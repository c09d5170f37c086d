"""Image preprocessing throughput: images/s per core for decode + pad + resize + crop + normalize.

Backends: Pillow (one thread), DALI's CPU pipeline (num_threads=1, i.e. per core), and DALI's mixed
(GPU) decoder when CUDA is available. Input: synthetic photo-like JPEGs (default 640 x 480, about
the COCO size in LLaVA's data), output 336 px, mode "pad".

  python benchmarks/bench_images.py [--n 128] [--width 640 --height 480] [--batch 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastllava.data import images


def make_jpegs(folder: Path, n: int, width: int, height: int) -> list[Path]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    paths = []
    for k in range(n):
        chans = [127 + 100 * np.sin(x / (11.0 + k) + c) * np.cos(y / 19.0 - c) for c in range(3)]
        arr = np.clip(np.stack(chans, -1) + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(p := folder / f"{k}.jpg", quality=90)
        paths.append(p)
    return paths


def rate(fn, n_images: int, repeat: int = 3) -> float:
    fn()  # warm-up: pipeline build, caches
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_images / best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=336)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    print(f"device: {'CUDA ' + torch.cuda.get_device_name() if cuda else 'no GPU: DALI GPU decoding not measured'}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.n, args.width, args.height)
        batches = [paths[i : i + args.batch] for i in range(0, len(paths), args.batch)]
        results = {}
        results["pillow, 1 thread"] = rate(lambda: [images.load_image(p, "pad", args.size, backend="pil") for p in paths], len(paths))
        if images.HAS_DALI:
            if cuda:
                results["dali mixed (GPU decode)"] = rate(
                    lambda: [images.load_images(b, "pad", args.size, backend="dali", num_threads=1) for b in batches], len(paths))
            else:
                results["dali cpu, 1 thread"] = rate(
                    lambda: [images.load_images(b, "pad", args.size, backend="dali", num_threads=1) for b in batches], len(paths))
        else:
            print("nvidia.dali not installed: DALI not measured (pip install nvidia-dali-cuda120)")
    print(f"\n{args.n} JPEGs {args.width}x{args.height} -> {args.size} px, mode pad, batch {args.batch}")
    for name, r in results.items():
        print(f"  {name:<26} {r:8.1f} images/s")


if __name__ == "__main__":
    main()
