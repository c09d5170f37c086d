"""Projected wall clock of a LLaVA-1.5 recipe: model FLOPs of each stage over its dataset profile,
divided by what the GPUs deliver at a measured or assumed MFU, beside the paper's numbers.

    python -m fastllava.plan --recipe llava-1.5-7b --gpus 8 --gpu A100-80G [--mfu 0.45] [--measured e2e.json]
    python -m fastllava.plan --memory --recipe llava-1.5-7b --gpus 8 --gpu A100-80G [--margin 0.1] [--lora 128]

    python -m fastllava.plan --flops --recipe llava-1.5-7b --gpus 8 --gpu A100-80G

--flops counts the FLOPs one optimizer step executes (FlopCounterMode under fake tensors,
fastllava/flop_audit.py) for fastllava and for the reference as LLaVA trains (FlashAttention-2, padded
batches of 16, gradient checkpointing) on the same samples, projects both stages' wall clock from the
executed FLOPs at one hardware FLOP rate (peak x --mfu) for both paths, and splits the reference's
overhead into what padding, full-length logits and recomputation add. --memory measures the peak memory
per rank of every candidate (pack size x activation checkpointing) by running the real model's optimizer
step under fake tensors (fastllava/memplan.py) and names the fastest configuration that fits.

FLOPs are counted exactly as the trainer counts them for MFU (fastllava/flops.py), per sample of the
modelled length profiles (fastllava.data.profile); peaks come from fastllava/hardware.py. With packing there is no padding, so
useful FLOPs are all the FLOPs; the reference path's padded batches add the overhead shown alongside.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.profile import STAGE_PROFILES, sample_lengths
from .data.reference_sampler import padding_efficiency, reference_batches
from .flops import FlopModel
from .hardware import BY_NAME, GPUS
from .hardware import gpu as gpu_spec
from .model.config import LlavaConfig, TextConfig, VisionConfig

VICUNA = {
    "llava-1.5-7b": TextConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32),
    "llava-1.5-13b": TextConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=40, num_key_value_heads=40),
}
# LLaVA-1.5 paper (Improved Baselines), 8x A100: stage 1 + stage 2 hours.
PAPER_HOURS = {"llava-1.5-7b": (3.5, 10.0), "llava-1.5-13b": (5.5, 20.0)}
STAGES = tuple(STAGE_PROFILES.items())  # (stage, its data profile), in training order
# Assumed MFU when nothing was measured: a placeholder until benchmarks/e2e.py runs on the target GPU.
DEFAULT_MFU = 0.40


def recipe_config(recipe: str) -> LlavaConfig:
    """The architecture of a LLaVA-1.5 recipe (CLIP ViT-L/14-336, mlp2x_gelu, Vicuna-1.5 with <image> and pad)."""
    if recipe not in VICUNA:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(VICUNA)}")
    return LlavaConfig(vision=VisionConfig(), text=VICUNA[recipe], projector_type="mlp2x_gelu")


@dataclass
class StagePlan:
    """One stage of a recipe, projected."""

    stage: str
    samples: int
    tokens: int
    pflops: float  # useful model FLOPs of the whole stage, 1e15
    padded_fraction: float  # extra tokens the reference's padded batches of 16 would compute
    mfu: float
    hours: float
    paper_hours: float


def plan(recipe: str, gpus: int, gpu: str, mfu: dict[str, float]) -> list[StagePlan]:
    """Both stages of `recipe` on `gpus` x `gpu` at the given MFU per stage ("align", "finetune")."""
    peak = gpu_spec(gpu).bf16_tflops
    config = recipe_config(recipe)
    out = []
    for (stage, profile), paper in zip(STAGES, PAPER_HOURS[recipe]):
        lengths, has_image = sample_lengths(profile, num_image_tokens=config.num_image_tokens)
        flop_model = FlopModel.build(config, stage)
        total = flop_model.flops(int(lengths.sum()), int((lengths.astype(np.float64) ** 2).sum()), int(has_image.sum()))
        seconds = total / (gpus * peak * 1e12 * mfu[stage])
        out.append(StagePlan(stage, len(lengths), int(lengths.sum()), total / 1e15,
                             1 - padding_efficiency(lengths, reference_batches(lengths, has_image, world_size=gpus)),
                             mfu[stage], seconds / 3600, paper))
    return out


def measured_mfu(path: Path) -> dict[str, float]:
    """MFU per stage from benchmarks/e2e.py's JSON output ({"stages": {"align": {"fastllava": {"mfu": ...}}}})."""
    try:
        data = json.loads(path.read_text())
        return {stage: float(v["fastllava"]["mfu"]) for stage, v in data["stages"].items() if v["fastllava"].get("mfu")}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not an e2e.py result with stages.<stage>.fastllava.mfu ({e})") from None


def format_table(recipe: str, gpus: int, gpu: str, stages: list[StagePlan], source: str) -> str:
    """The plan as a markdown table with the paper's hours beside it."""
    rows = [f"{recipe} on {gpus}x {gpu} (MFU {source})", "",
            "| stage | samples | tokens | model PFLOPs | MFU | projected | paper (8x A100) | reference padding |",
            "|---|---|---|---|---|---|---|---|"]
    for s in stages:
        rows.append(f"| {s.stage} | {s.samples:,} | {s.tokens / 1e6:,.0f} M | {s.pflops:,.0f} | {100 * s.mfu:.0f}% "
                    f"| {s.hours:.2f} h | {s.paper_hours:.1f} h | {100 * s.padded_fraction:.0f}% |")
    total = sum(s.hours for s in stages)
    rows.append(f"| total | | | | | {total:.2f} h | {sum(s.paper_hours for s in stages):.1f} h | |")
    return "\n".join(rows)


def main(argv=None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m fastllava.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="llava-1.5-7b", choices=sorted(VICUNA))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu", default="A100-80G", choices=list(BY_NAME))
    parser.add_argument("--mfu", type=float, default=None, help=f"assumed MFU for both stages (default {DEFAULT_MFU})")
    parser.add_argument("--measured", type=Path, default=None, help="benchmarks/e2e.py JSON output")
    parser.add_argument("--flops", action="store_true", help="FLOP audit: executed / useful FLOPs, both paths")
    parser.add_argument("--memory", action="store_true", help="peak memory per rank of each candidate config")
    parser.add_argument("--margin", type=float, default=0.10, help="memory left free, fraction (default 0.10)")
    parser.add_argument("--stages", nargs="+", default=[s for s, _ in STAGES], choices=[s for s, _ in STAGES])
    parser.add_argument("--pack-tokens", nargs="+", type=int, default=None, help="candidate data.max_tokens_per_pack")
    parser.add_argument("--checkpointing", nargs="+", default=None, choices=("none", "selective", "full"))
    parser.add_argument("--replicate", type=int, default=1, help="parallel.replicate (HSDP) for --memory")
    parser.add_argument("--full-depth", action="store_true", help="--memory at the full decoder depth (slower)")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="--memory of LoRA fine-tuning at this rank (stage finetune; LLaVA's: 128)")
    args = parser.parse_args(argv)
    if args.memory:
        _memory(parser, args)
        return
    if args.flops:
        _flops(parser, args)
        return
    mfu = {stage: args.mfu or DEFAULT_MFU for stage, _ in STAGES}
    source = f"assumed {100 * (args.mfu or DEFAULT_MFU):.0f}%"
    if args.gpus < 1 or args.mfu is not None and not 0 < args.mfu <= 1:
        parser.error(f"--gpus must be >= 1 and --mfu in (0, 1]; got {args.gpus} and {args.mfu}")
    if args.measured:
        try:
            mfu.update(measured_mfu(args.measured))
        except ValueError as e:
            parser.error(str(e))
        source = f"measured in {args.measured}"
    print(format_table(args.recipe, args.gpus, args.gpu, plan(args.recipe, args.gpus, args.gpu, mfu), source))


# The recipes' data.max_tokens_per_pack per stage (recipes/configs/llava15_*_{pretrain,finetune}.yaml, all
# with activation checkpointing none): what --flops audits by default.
RECIPE_PACK = {"llava-1.5-7b": {"align": 8192, "finetune": 8192}, "llava-1.5-13b": {"align": 8192, "finetune": 4096}}


def _flops(parser, args) -> None:
    from .flop_audit import audit_flops, format_breakdown

    if args.gpus < 1 or args.mfu is not None and not 0 < args.mfu <= 1:
        parser.error(f"--gpus must be >= 1 and --mfu in (0, 1]; got {args.gpus} and {args.mfu}")
    mfu = args.mfu or DEFAULT_MFU
    mode = (args.checkpointing or ["none"])[0]
    config = recipe_config(args.recipe)
    stages = {s.stage: s for s in plan(args.recipe, args.gpus, args.gpu, {st: mfu for st, _ in STAGES})}
    print(f"{args.recipe} on {args.gpus}x {args.gpu}: one optimizer step under FlopCounterMode (fake tensors), "
          f"fastllava with activation checkpointing {mode}, the reference as LLaVA trains (FlashAttention-2, "
          f"gradient checkpointing); wall clock = executed FLOPs / (GPUs x peak x {mfu:.2f})\n")
    print("| stage | useful TFLOP/step | fastllava executed / useful | reference executed / useful "
          "| fastllava projected | reference projected |")
    print("|---|---|---|---|---|---|")
    audits = []
    for stage in args.stages:
        pack = (args.pack_tokens or [RECIPE_PACK[args.recipe][stage]])[0]
        audit = audit_flops(config, stage, world=args.gpus, max_tokens=pack, checkpointing=mode)
        audits.append(audit)
        fast, ref = audit.ratios()
        hours = stages[stage].hours  # useful FLOPs at the MFU; executed = useful x ratio at the same rate
        print(f"| {stage} | {audit.useful / 1e12:,.0f} | {fast:.3f} | {ref:.3f} | {hours * fast:.2f} h "
              f"| {hours * ref:.2f} h |", flush=True)
    print("\nWhere the reference's FLOPs go (each line: what one of its choices adds, x useful):\n")
    print(format_breakdown(audits))


def _memory(parser, args) -> None:
    from . import memplan

    packs = args.pack_tokens or list(memplan.PACK_TOKENS)
    if not 0 <= args.margin < 1 or args.gpus < 1 or args.replicate < 1 or args.gpus % args.replicate or min(packs) < 2:
        parser.error(f"need --margin in [0, 1), --gpus >= 1, --replicate dividing --gpus, --pack-tokens >= 2; got "
                     f"{args.margin}, {args.gpus}, {args.replicate}, {packs}")
    stages = args.stages
    if args.lora < 0:
        parser.error(f"--lora must be a rank >= 1 (or 0 for full fine-tuning), got {args.lora}")
    if args.lora:
        if stages == ["align"]:
            parser.error("--lora: LoRA is a stage-2 method; stage align trains only the projector")
        stages = ["finetune"]
    memory = gpu_spec(args.gpu).memory_gib
    print(f"{args.recipe} on {args.gpus}x {args.gpu} ({memory:g} GiB), fake tensors (fastllava/memplan.py)\n")
    report, _ = memplan.memory_plan(recipe_config(args.recipe), world=args.gpus, memory_gib=memory, margin=args.margin,
                                    stages=stages, pack_tokens=packs, lora_rank=args.lora,
                                    checkpointing=args.checkpointing or memplan.CHECKPOINTING,
                                    replicate=args.replicate, full_depth=args.full_depth,
                                    others={g.name: g.memory_gib for g in GPUS if g.name != args.gpu})
    print(report)


if __name__ == "__main__":
    main()
