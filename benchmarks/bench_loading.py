"""Peak host memory of Llava.from_pretrained on a generated multi-shard checkpoint.

Streaming loading should peak near one tensor plus the model itself, not at the model twice.
Each measurement runs in a fresh subprocess so ru_maxrss belongs to that load alone.

    python benchmarks/bench_loading.py [--gb 3] [--dir /tmp/fastllava-ckpt]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def make_checkpoint(path: Path, target_gb: float) -> int:
    """A random fp16 llava-hf checkpoint of about target_gb, in 1 GB shards. Returns its size in bytes."""
    from fastllava import Llava, LlavaConfig
    from fastllava.model import TextConfig, VisionConfig

    hidden, inter = 2048, 5504
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter)
    layers = max(1, int(target_gb * 2**30 / per_layer))
    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        text=TextConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=16, num_key_value_heads=16),
    )
    # Built and written layer by layer would be leaner; fp16 from the start keeps this step near 1x.
    model = Llava.from_config(cfg, dtype=torch.float16)
    model.save_pretrained(path, max_shard_bytes=2**30)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(path: Path) -> dict:
    code = (
        "import resource, time, torch; from fastllava import Llava; t = time.perf_counter(); "
        f"m = Llava.from_pretrained({str(path)!r}); dt = time.perf_counter() - t; "
        "n = sum(p.numel() * p.element_size() for p in m.parameters()); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, n, dt)"
    )
    base = "import resource, torch, fastllava; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    idle_kb = int(subprocess.run([sys.executable, "-c", base], capture_output=True, text=True, check=True).stdout)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    peak_kb, model_bytes, seconds = int(out[0]), int(out[1]), float(out[2])
    return {"peak_rss_gb": peak_kb / 2**20, "import_rss_gb": idle_kb / 2**20, "model_gb": model_bytes / 2**30,
            "load_seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=3.0, help="checkpoint size to generate")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fastllava-bench-ckpt"))
    args = parser.parse_args()
    if not (args.dir / "model.safetensors.index.json").exists():
        t = time.perf_counter()
        size = make_checkpoint(args.dir, args.gb)
        print(f"generated {size / 2**30:.2f} GB in {time.perf_counter() - t:.0f} s at {args.dir}")
    shards = sorted(args.dir.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    r = measure(args.dir)
    print("| checkpoint | shards | largest shard | model in memory | peak RSS | RSS after imports | load time |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {size / 2**30:.2f} GB | {len(shards)} | {max(f.stat().st_size for f in shards) / 2**30:.2f} GB "
          f"| {r['model_gb']:.2f} GB | {r['peak_rss_gb']:.2f} GB | {r['import_rss_gb']:.2f} GB | {r['load_seconds']:.1f} s |")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
