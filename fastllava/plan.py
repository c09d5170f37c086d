"""Projected wall clock of a LLaVA-1.5 recipe: model FLOPs of each stage over its dataset profile,
divided by what the GPUs deliver at a measured or assumed MFU, beside the paper's numbers.

    python -m fastllava.plan --recipe llava-1.5-7b --gpus 8 --gpu A100-80G [--mfu 0.45] [--measured e2e.json]

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

from .data.profile import sample_lengths
from .data.reference_sampler import padding_efficiency, reference_batches
from .flops import FlopModel
from .hardware import BY_NAME, gpu as gpu_spec
from .model.config import LlavaConfig, TextConfig, VisionConfig

VICUNA = {
    "llava-1.5-7b": TextConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32),
    "llava-1.5-13b": TextConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=40, num_key_value_heads=40),
}
# LLaVA-1.5 paper (Improved Baselines), 8x A100: stage 1 + stage 2 hours.
PAPER_HOURS = {"llava-1.5-7b": (3.5, 10.0), "llava-1.5-13b": (5.5, 20.0)}
STAGES = (("align", "pretrain558k"), ("finetune", "mix665k"))
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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    main()
