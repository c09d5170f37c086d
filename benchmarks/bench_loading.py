"""Peak host memory of loading a generated multi-shard checkpoint (bf16, a ~1B-parameter LLaMA shape).

One process (`--ranks 1`): Llava.from_pretrained. Streaming loading should peak near one tensor plus
the model itself, not at the model twice. Each measurement runs in a fresh subprocess so ru_maxrss
belongs to that load alone.

Several ranks (`--ranks 2`, gloo on CPU, under torchrun): the trainer's two ways to get a sharded model,
each rank's peak RSS reported against the fp32 model, its own shard and the largest tensor:
  old  every rank loads the whole model (build_model meta=False), then FSDP keeps its shard;
  new  the model is built on the meta device, sharded, and each rank reads only its rows
       (build_model meta=True + sharded_load.parallelize_and_load).
The goal of the new path: peak minus the RSS after imports below one shard plus one tensor.

`--export` (with --ranks > 1): after the new path's load, the stage-2 export the other way round, each
rank's peak RSS above its RSS before the export (Linux: the high-water mark is reset through
/proc/self/clear_refs), with 512 MiB safetensors shards:
  gathered  get_model_state_dict(full_state_dict=True, cpu_offload=True) on rank 0, then the writer
            (what train/export.py did before 2026-11-30): rank 0 holds the whole fp32 model;
  streamed  train/export.py: one parameter at a time into the shard writer: rank 0 holds one shard
            plus the tensor in hand.

    python benchmarks/bench_loading.py [--gb 2] [--ranks 2] [--export] [--dir /tmp/fastllava-ckpt]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def make_checkpoint(path: Path, target_gb: float) -> int:
    """A random bf16 llava-hf checkpoint of about target_gb, in 1 GB shards. Returns its size in bytes."""
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
    # Built and written layer by layer would be leaner; bf16 from the start keeps this step near 1x.
    model = Llava.from_config(cfg, dtype=torch.bfloat16)
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


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rss_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def export_worker(model, env, kind: str) -> None:
    """The stage-2 export of `model` (already sharded) as `kind` does it; prints each rank's peak RSS above
    its RSS before the export."""
    import tempfile

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fastllava.train.distributed import barrier
    from fastllava.train.export import gathered_parameters

    shard_bytes = 512 * 2**20
    out = Path(tempfile.mkdtemp(prefix=f"export-{kind}-"))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss_gb("VmRSS")
    t = time.perf_counter()
    if kind == "gathered":
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.is_main:
            model.save_pretrained(out, state=state.items(), max_shard_bytes=shard_bytes)
    else:
        parameters = gathered_parameters(model, keep=env.is_main)
        if env.is_main:
            model.save_pretrained(out, state=parameters, max_shard_bytes=shard_bytes)
        else:
            for _ in parameters:
                pass
    barrier()
    params = list(model.parameters())
    print(json.dumps({"rank": env.rank, "path": kind, "export_extra_gb": _rss_gb("VmHWM") - before,
                      "model_gb": sum(p.numel() * p.element_size() for p in params) / 2**30,
                      "largest_tensor_gb": max(p.numel() * p.element_size() for p in params) / 2**30,
                      "shard_file_gb": shard_bytes / 2**30, "export_seconds": time.perf_counter() - t}), flush=True)


def worker(path: Path, kind: str, export_kind: str | None = None) -> None:
    """One rank of a multi-rank measurement (run by torchrun): prints one JSON line."""
    from fastllava.config import load_config
    from fastllava.data.tokenize import TokenizerIds
    from fastllava.model.safetensors_io import read_config
    from fastllava.train.build import build_model
    from fastllava.train.distributed import init_distributed
    from fastllava.train.freeze import set_trainable
    from fastllava.train.sharded_load import parallelize_and_load

    env = init_distributed("cpu")
    import_gb = _peak_gb()
    cfg = load_config(None, ["model.source=pretrained", f"model.pretrained_path={path}", "train.device=cpu",
                             "parallel.activation_checkpointing=none"])
    vocab = read_config(path)["text_config"]["vocab_size"]  # a multiple of 64: no growth
    ids = TokenizerIds(image_token_id=vocab - 1, pad_token_id=0, vocab_size=vocab)
    t = time.perf_counter()
    model = build_model(cfg, ids, meta=kind == "new")
    set_trainable(model, "finetune")
    parallelize_and_load(model, cfg.parallel, env.device, stage="finetune")
    seconds = time.perf_counter() - t
    params = list(model.parameters())
    shard = sum(p.to_local().numel() * p.to_local().element_size() for p in params)
    if export_kind:
        return export_worker(model, env, export_kind)
    print(json.dumps({"rank": env.rank, "path": kind, "peak_rss_gb": _peak_gb(), "import_rss_gb": import_gb,
                      "model_gb": sum(p.numel() * p.element_size() for p in params) / 2**30,
                      "shard_gb": shard / 2**30,
                      "largest_tensor_gb": max(p.numel() * p.element_size() for p in params) / 2**30,
                      "load_seconds": seconds}), flush=True)


def measure_ranks(path: Path, ranks: int, kind: str, export_kind: str | None = None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    extra = ["--export-worker", export_kind] if export_kind else []
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           __file__, "--worker", kind, "--dir", str(path), *extra],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size to generate")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fastllava-bench-ckpt"))
    parser.add_argument("--ranks", type=int, default=1, help="> 1: the trainer's old and new sharded loading")
    parser.add_argument("--paths", default="old,new", help="with --ranks > 1: which paths to measure")
    parser.add_argument("--export", action="store_true", help="with --ranks > 1: measure the export instead")
    parser.add_argument("--worker", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--export-worker", choices=["gathered", "streamed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.dir, args.worker, args.export_worker)
    if not (args.dir / "model.safetensors.index.json").exists():
        t = time.perf_counter()
        size = make_checkpoint(args.dir, args.gb)
        print(f"generated {size / 2**30:.2f} GB in {time.perf_counter() - t:.0f} s at {args.dir}")
    shards = sorted(args.dir.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    if args.ranks > 1 and args.export:
        print(f"export of a {size / 2**30:.2f} GB checkpoint loaded as fp32 by {args.ranks} ranks (gloo, CPU), "
              "512 MiB shard files")
        print("| export | rank | model (fp32) | largest tensor | peak RSS above before | time |")
        print("|---|---|---|---|---|---|")
        for kind in ("gathered", "streamed"):
            for r in measure_ranks(args.dir, args.ranks, "new", kind):
                print(f"| {kind} | {r['rank']} | {r['model_gb']:.2f} GB | {r['largest_tensor_gb']:.2f} GB "
                      f"| {r['export_extra_gb']:.2f} GB | {r['export_seconds']:.1f} s |", flush=True)
        return
    if args.ranks > 1:
        print(f"checkpoint {size / 2**30:.2f} GB in {len(shards)} files, {args.ranks} ranks (gloo, CPU)")
        print("| path | rank | model (fp32) | its shard | largest tensor | peak RSS | RSS after imports "
              "| peak - imports | load time |")
        print("|---|---|---|---|---|---|---|---|---|")
        for kind in args.paths.split(","):
            for r in measure_ranks(args.dir, args.ranks, kind):
                print(f"| {kind} | {r['rank']} | {r['model_gb']:.2f} GB | {r['shard_gb']:.2f} GB "
                      f"| {r['largest_tensor_gb']:.2f} GB | {r['peak_rss_gb']:.2f} GB | {r['import_rss_gb']:.2f} GB "
                      f"| {r['peak_rss_gb'] - r['import_rss_gb']:.2f} GB | {r['load_seconds']:.1f} s |", flush=True)
        return
    r = measure(args.dir)
    print("| checkpoint | shards | largest shard | model in memory | peak RSS | RSS after imports | load time |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {size / 2**30:.2f} GB | {len(shards)} | {max(f.stat().st_size for f in shards) / 2**30:.2f} GB "
          f"| {r['model_gb']:.2f} GB | {r['peak_rss_gb']:.2f} GB | {r['import_rss_gb']:.2f} GB | {r['load_seconds']:.1f} s |")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
