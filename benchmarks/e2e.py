"""End-to-end training throughput: fastllava against the reference LLaVA recipe, same device, same run.

Both paths train the same model shape on the same synthetic samples (fastllava.reference.make_samples:
lengths drawn from the 665K mix or 558K caption profile, random tokens and pixels) for whole optimizer
steps:

- reference: LLaVA's training step on transformers' LlavaForConditionalGeneration (fastllava/reference.py,
  the same builder the FLOP audit counts): per-device batches of 16 formed as LLaVA's modality-grouped
  length sampler forms them, right-padded to the longest sample, image features written into the
  embeddings, gradient checkpointing on, FlashAttention-2 as LLaVA trains when flash-attn is installed
  (SDPA otherwise; the report names which), AdamW;
- fastllava: fastllava.Llava on packs planned by fastllava.data.packing.plan_steps, kernels chosen by
  `auto` (Triton on CUDA), no activation checkpointing, AdamW.

Frozen parts follow the stage: `align` trains the projector only, `finetune` the projector and LLM.
Both paths keep parameters in the benchmark dtype (bf16 on GPU) with torch AdamW.
Reported per stage: real (non-padding) tokens/s, samples/s, step time, MFU (the trainer's FLOP
count on real tokens, so padding is never counted as useful work), peak memory, and the speedup.

    python benchmarks/e2e.py                              # tiny shape on CPU (what CI runs)
    python benchmarks/e2e.py --shape 7b --layers 8        # on a GPU: the 7B shape, 8 decoder layers
    python benchmarks/e2e.py --json e2e.json              # also write JSON for `python -m fastllava.plan --measured`
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fastllava import Llava, LlavaConfig, PackedBatch
from fastllava.data.packing import plan_steps
from fastllava.data.profile import STAGE_PROFILES
from fastllava.flops import FlopModel
from fastllava.hardware import peak_tflops
from fastllava.plan import recipe_config
from fastllava.reference import (
    REFERENCE_DEVICE_BATCH,
    build_reference,
    make_samples,
    pad_batch,
    reference_loss,
    step_batches,
)
from fastllava.testing import tiny_config
from fastllava.train.freeze import set_trainable


@dataclass
class Shape:
    config: LlavaConfig
    max_length: int
    pack_tokens: int
    global_batch: int


def make_shape(name: str, layers: int | None) -> Shape:
    if name == "tiny":
        config = tiny_config(vision=dict(hidden_size=64, intermediate_size=128, image_size=56),
                             text=dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                                       num_hidden_layers=layers or 2))
        return Shape(config, 256, 1024, 16)
    if name == "7b":
        config = recipe_config("llava-1.5-7b")
        text = replace(config.text, num_hidden_layers=layers or 4)
        return Shape(replace(config, text=text), 2048, 16384, 128)
    raise ValueError(f"unknown shape {name!r}: tiny or 7b")


def shape_samples(shape: Shape, stage: str, n: int, seed: int) -> list[dict]:
    """`n` samples of the stage's profile at the shape's longest length (fastllava.reference.make_samples)."""
    return make_samples(shape.config, STAGE_PROFILES[stage], n, seed, max_length=shape.max_length)


def reference_attention(device: torch.device) -> str:
    """LLaVA trains with FlashAttention-2 (train_mem.py); where flash-attn cannot run, SDPA."""
    usable = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if usable else "sdpa"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the two paths: each builds its model and optimizer once, then turns samples into step callables ----


class ReferencePath:
    name = "reference"

    def __init__(self, shape: Shape, stage: str, device: torch.device, dtype: torch.dtype):
        with torch.device(device):
            llm = reference_attention(device)  # the tower keeps SDPA (LLaVA's runs CLIP's own attention)
            self.model = build_reference(shape.config, stage, dtype=dtype,
                                         attn_implementation={"": "sdpa", "text_config": llm, "vision_config": "sdpa"})
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
        self.shape, self.device, self.dtype = shape, device, dtype

    def _micro(self, samples, accum):
        """One padded per-device batch; returns the tokens it computed (padding included)."""
        batch = pad_batch(self.shape.config, samples).to(self.device, self.dtype)
        (reference_loss(self.model, self.shape.config, batch) / accum).backward()
        return batch.input_ids.numel()

    def steps(self, samples: list[dict]):
        batches = step_batches(samples, world=1)
        accum = self.shape.global_batch // REFERENCE_DEVICE_BATCH

        def step(group):
            def run():
                computed = sum(self._micro([samples[i] for i in b], len(group)) for b in group)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                return computed
            return run

        return [step(batches[i : i + accum]) for i in range(0, len(batches), accum)]


class FastllavaPath:
    name = "fastllava"

    def __init__(self, shape: Shape, stage: str, device: torch.device, dtype: torch.dtype):
        self.model = Llava.from_config(shape.config, dtype=dtype).to(device)
        self.model.train()
        set_trainable(self.model, stage)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
        self.shape, self.device = shape, device

    def steps(self, samples: list[dict]):
        n_img = self.shape.config.num_image_tokens
        lengths = np.array([s["length"] for s in samples])

        def step(plan):
            packs = [PackedBatch.from_samples([samples[i] for i in b], image_token_id=self.shape.config.image_token_id,
                                              num_image_tokens=n_img) for b in plan.rank(0) if b]
            # The step's loss is normalized by its label tokens across all packs (as the trainer does).
            total_labels = sum(p.num_label_tokens() for p in packs)

            def run():
                for pack in packs:
                    out = self.model(pack.to(self.device, non_blocking=True))
                    (out.loss_sum / total_labels).backward()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                return sum(p.num_tokens for p in packs)
            return run

        return [step(p) for p in plan_steps(lengths, self.shape.global_batch, self.shape.pack_tokens, seed=0)]


# --- measurement --------------------------------------------------------------------------------


def measure(path_cls, shape, stage, samples, warmup, device, dtype, peak_tflops) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    path = path_cls(shape, stage, device, dtype)
    for run in path.steps(warmup):
        run()
    steps = path.steps(samples)
    sync(device)
    start = time.perf_counter()
    computed = sum(run() for run in steps)
    sync(device)
    seconds = time.perf_counter() - start
    real = sum(s["length"] for s in samples)
    lengths = np.array([s["length"] for s in samples], dtype=np.float64)
    images = sum(s["pixel_values"] is not None for s in samples)
    flops = FlopModel.build(shape.config, stage).flops(int(lengths.sum()), int((lengths**2).sum()), images)
    result = {
        "real_tokens_per_s": real / seconds,
        "samples_per_s": len(samples) / seconds,
        "step_seconds": seconds / len(steps),
        "steps": len(steps),
        "real_tokens": real,
        "computed_tokens": computed,
        "mfu": flops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    del path
    gc.collect()
    return result


def fmt(value, spec, unit=""):
    """A number, or n/a where it means nothing (MFU and GPU memory on CPU)."""
    return "n/a" if value is None else format(value, spec) + unit


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "7b"), default=None, help="default: 7b on CUDA, tiny on CPU")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (MFU is per layer; default 4 for 7b)")
    parser.add_argument("--stages", nargs="+", default=["align", "finetune"], choices=("align", "finetune"))
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per path and stage")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device peak for MFU")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = make_shape(args.shape or ("7b" if device.type == "cuda" else "tiny"), args.layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = peak_tflops(device, args.peak_tflops)
    torch.manual_seed(0)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "reference_attention": reference_attention(device),
        "shape": {"name": args.shape or ("7b" if device.type == "cuda" else "tiny"),
                  "decoder_layers": shape.config.text.num_hidden_layers, "hidden": shape.config.text.hidden_size,
                  "global_batch": shape.global_batch, "pack_tokens": shape.pack_tokens},
        "stages": {},
    }
    for stage in args.stages:
        samples = shape_samples(shape, stage, args.steps * shape.global_batch, seed=1)
        warmup = shape_samples(shape, stage, shape.global_batch, seed=2)
        results = {p.name: measure(p, shape, stage, samples, warmup, device, dtype, peak)
                   for p in (ReferencePath, FastllavaPath)}
        results["speedup"] = results["fastllava"]["real_tokens_per_s"] / results["reference"]["real_tokens_per_s"]
        report["stages"][stage] = results

    print(f"device {report['device']}, {report['dtype']}, shape {report['shape']}, "
          f"reference attention {report['reference_attention']}")
    print("| stage | path | real tok/s | samples/s | step s | computed/real tokens | MFU | peak mem GB |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, results in report["stages"].items():
        for name in ("reference", "fastllava"):
            r = results[name]
            print(f"| {stage} | {name} | {r['real_tokens_per_s']:,.0f} | {r['samples_per_s']:.2f} | {r['step_seconds']:.3f} "
                  f"| {r['computed_tokens'] / r['real_tokens']:.2f} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f', '%')} "
                  f"| {fmt(r['peak_memory_gb'], '.1f')} |")
        print(f"| {stage} | speedup | {results['speedup']:.2f}x | | | | | |")
    if device.type == "cpu":
        print("CPU run: MFU and memory are not applicable; the speedup at this tiny shape says little about GPUs.")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main(sys.argv[1:])
