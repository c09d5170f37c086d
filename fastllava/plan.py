"""Projected wall clock of a LLaVA-1.5 or LLaVA-NeXT recipe: model FLOPs of each stage over its dataset profile,
divided by what the GPUs deliver at a measured or assumed MFU, beside the paper's numbers.

    python -m fastllava.plan --recipe llava-1.5-7b --gpus 8 --gpu A100-80G [--mfu 0.45] [--measured e2e.json]
    python -m fastllava.plan --memory --recipe llava-1.5-7b --gpus 8 --gpu A100-80G [--margin 0.1] [--lora 128]

    python -m fastllava.plan --flops --recipe llava-1.5-7b --gpus 8 --gpu A100-80G

Recipes (RECIPES, one per pair of recipes/configs/ files): llava-1.5-7b and llava-1.5-13b (CLIP-336 and
Vicuna-1.5, the paper's), llava-1.5-qwen2.5-7b-siglip (siglip-so400m-patch14-384 and Qwen2.5-7B-Instruct),
llava-1.5-llama3.1-8b (CLIP-336 and Llama-3.1-8B-Instruct), all on LLaVA-1.5's data and schedule; and
(ANYRES_RECIPES) llava-next-7b: LLaVA-NeXT's (LLaVA-1.6) CLIP-336 + Vicuna-7B-v1.5, stage 1 as LLaVA-1.5's,
stage 2 with AnyRes at llava-v1.6's grid and the vision tower trained, on the 665K mix with each image of a
modelled size (fastllava.data.profile.IMAGE_SIZES), model_max_length 4096; its reference is LLaVA-NeXT's step
(fastllava/reference.py: padded per-device batches of 4, gradient checkpointing).

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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .anyres import DEFAULT_PINPOINTS
from .data.profile import STAGE_PROFILES, sample_profile
from .data.reference_sampler import padding_efficiency, reference_batches
from .flops import FlopModel
from .hardware import BY_NAME, GPUS
from .hardware import gpu as gpu_spec
from .model.config import LlavaConfig
from .reference import MAX_LENGTH, device_batch

# The checkpoints' config.json fields that shape the model (what loading reads from the directories the
# recipes' model.vision_path / model.llm_path name), read by the families as loading reads them.
SIGLIP_SO400M_384 = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                     "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
                     "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}  # google/siglip-so400m-patch14-384
QWEN25_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
             "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
             "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645}  # Qwen/Qwen2.5-7B-Instruct
LLAMA31_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192},
              "bos_token_id": 128000, "eos_token_id": 128009}  # meta-llama/Llama-3.1-8B-Instruct
VICUNA_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32}  # lmsys/vicuna-7b-v1.5
VICUNA_13B = {**VICUNA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 40}  # lmsys/vicuna-13b-v1.5
CLIP_L_336 = {"model_type": "clip_vision_model"}  # openai/clip-vit-large-patch14-336: VisionConfig's defaults


@dataclass(frozen=True)
class Recipe:
    """A recipe of recipes/configs/ as the plan models it. The vocabulary is the model's once train/build.py
    has added `<image>` (and a pad token where the tokenizer has neither pad nor unk) and padded the embedding
    to a multiple of 64, never shrinking it: Vicuna's 32,000-token tokenizer gains <image> 32000 (pad = unk,
    0): 32,064 rows; Qwen2.5's 151,665 tokens (pad <|endoftext|>) gain <image> 151665 inside its 152,064
    rows; Llama-3.1's 128,256 (neither pad nor unk) gain <image> 128256 and <pad> 128257: 128,320 rows."""

    vision: dict  # the tower's config.json fields
    llm: dict  # the decoder's
    image_token_id: int
    pad_token_id: int
    tokenizer_size: int  # len(tokenizer) with the tokens train/build.py adds
    pack: dict  # data.max_tokens_per_pack per stage in the recipe's YAML files (what --flops audits)
    paper_hours: tuple | None = None  # (stage 1, stage 2) hours on 8x A100 where a paper reports them
    pinpoints: tuple | None = None  # AnyRes grid (height, width) of stage finetune (LLaVA-NeXT); None: fixed
    unfreeze_vision: tuple = ()  # the stages that train the vision tower (train.unfreeze_vision)
    checkpointing: dict | None = None  # parallel.activation_checkpointing per stage in the YAML files (default none)

    def config(self, stage: str = "finetune") -> LlavaConfig:
        """The recipe's architecture in `stage`: LLaVA-1.5's connector (mlp2x_gelu, the second-to-last layer's
        patches), with AnyRes at `pinpoints` in stage finetune (stage align is LLaVA-1.5's, as LLaVA-NeXT's)."""
        from .model.families import find

        vision = find("tower", self.vision["model_type"], "the recipe's tower").read_config(self.vision)
        text = find("decoder", self.llm["model_type"], "the recipe's decoder").read_config(self.llm)
        rows = -(-self.tokenizer_size // 64) * 64
        text = replace(text, vocab_size=max(text.vocab_size, rows))
        pinpoints = [list(p) for p in self.pinpoints] if self.pinpoints and stage == "finetune" else None
        return LlavaConfig(vision=vision, text=text, projector_type="mlp2x_gelu", vision_feature_layer=-2,
                           image_token_id=self.image_token_id, pad_token_id=self.pad_token_id,
                           image_grid_pinpoints=pinpoints)

    def checkpointing_of(self, stage: str) -> str:
        """The YAML file's parallel.activation_checkpointing of `stage`."""
        return (self.checkpointing or {}).get(stage, "none")


# LLaVA-1.5 paper (Improved Baselines), 8x A100: stage 1 + stage 2 hours. data.max_tokens_per_pack of the
# recipes/configs/llava15_*_{pretrain,finetune}.yaml files (all with activation checkpointing none).
RECIPES = {
    "llava-1.5-7b": Recipe(CLIP_L_336, VICUNA_7B, 32000, 0, 32001, {"align": 8192, "finetune": 8192}, (3.5, 10.0)),
    "llava-1.5-13b": Recipe(CLIP_L_336, VICUNA_13B, 32000, 0, 32001, {"align": 8192, "finetune": 4096}, (5.5, 20.0)),
    "llava-1.5-qwen2.5-7b-siglip": Recipe(SIGLIP_SO400M_384, QWEN25_7B, 151665, 151643, 151666,
                                          {"align": 8192, "finetune": 4096}),
    "llava-1.5-llama3.1-8b": Recipe(CLIP_L_336, LLAMA31_8B, 128256, 128257, 128258, {"align": 8192, "finetune": 4096}),
}
# LLaVA-NeXT: recipes/configs/llava_next_7b_{pretrain,finetune}.yaml (stage 1 is llava15_7b_pretrain.yaml's; stage
# 2 AnyRes at llava-v1.6's pinpoints, tower trained at optim.vision_lr, no activation checkpointing). Its own
# table: train/faults.py names the plan nearest a decoder's shape, and this decoder is llava-1.5-7b's.
ANYRES_RECIPES = {
    "llava-next-7b": Recipe(CLIP_L_336, VICUNA_7B, 32000, 0, 32001, {"align": 8192, "finetune": 8192},
                            pinpoints=DEFAULT_PINPOINTS, unfreeze_vision=("finetune",)),
}
ALL_RECIPES = {**RECIPES, **ANYRES_RECIPES}
STAGES = tuple(STAGE_PROFILES.items())  # (stage, its data profile), in training order
# Assumed MFU when nothing was measured: a placeholder until benchmarks/e2e.py runs on the target GPU.
DEFAULT_MFU = 0.40


def recipe_config(recipe: str, stage: str = "finetune") -> LlavaConfig:
    """The architecture of a recipe in `stage` (ALL_RECIPES: tower, mlp2x_gelu, decoder with the added tokens,
    AnyRes in an AnyRes recipe's stage finetune)."""
    if recipe not in ALL_RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(ALL_RECIPES)}")
    return ALL_RECIPES[recipe].config(stage)


@dataclass
class StagePlan:
    """One stage of a recipe, projected."""

    stage: str
    samples: int
    tokens: int
    pflops: float  # useful model FLOPs of the whole stage, 1e15
    padded_fraction: float  # extra tokens the reference's padded batches (16; LLaVA-NeXT: 4) would compute
    mfu: float
    hours: float
    paper_hours: float | None  # None: no paper reports this recipe


def plan(recipe: str, gpus: int, gpu: str, mfu: dict[str, float]) -> list[StagePlan]:
    """Both stages of `recipe` on `gpus` x `gpu` at the given MFU per stage ("align", "finetune")."""
    peak = gpu_spec(gpu).bf16_tflops
    spec = ALL_RECIPES[recipe]
    out = []
    for (stage, profile), paper in zip(STAGES, spec.paper_hours or (None, None)):
        config = spec.config(stage)
        lengths, has_image, tiles, visual = stage_profile(config, profile)
        flop_model = FlopModel.build(config, stage, unfreeze_vision=stage in spec.unfreeze_vision)
        total = flop_model.flops(int(lengths.sum()), int((lengths.astype(np.float64) ** 2).sum()), int(tiles.sum()))
        seconds = total / (gpus * peak * 1e12 * mfu[stage])
        batches = reference_batches(lengths, has_image, batch_size=device_batch(config), world_size=gpus,
                                    group_lengths=lengths - visual)
        out.append(StagePlan(stage, len(lengths), int(lengths.sum()), total / 1e15,
                             1 - padding_efficiency(lengths, batches), mfu[stage], seconds / 3600, paper))
    return out


def stage_profile(config: LlavaConfig, profile: str) -> tuple[np.ndarray, ...]:
    """(lengths, has_image, tiles, image_tokens) of the whole modelled data set of a stage, as `config` sees
    it: AnyRes images of the profile's sizes and their own token and tile counts, truncated at the reference's
    model_max_length (reference.MAX_LENGTH: 2048, AnyRes 4096)."""
    drawn = sample_profile(profile, num_image_tokens=config.num_image_tokens, anyres=config.anyres,
                           model_max_length=MAX_LENGTH[config.anyres is not None])
    return drawn["lengths"], drawn["has_image"], drawn["tiles"], drawn["image_tokens"]


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

    def hours(h):
        return "-" if h is None else f"{h:.1f} h"

    for s in stages:
        rows.append(f"| {s.stage} | {s.samples:,} | {s.tokens / 1e6:,.0f} M | {s.pflops:,.0f} | {100 * s.mfu:.0f}% "
                    f"| {s.hours:.2f} h | {hours(s.paper_hours)} | {100 * s.padded_fraction:.0f}% |")
    total = sum(s.hours for s in stages)
    papers = [s.paper_hours for s in stages]
    rows.append(f"| total | | | | | {total:.2f} h | {hours(None if None in papers else sum(papers))} | |")
    return "\n".join(rows)


def main(argv=None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m fastllava.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="llava-1.5-7b", choices=sorted(ALL_RECIPES))
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


def _flops(parser, args) -> None:
    from .flop_audit import audit_flops, format_breakdown

    if args.gpus < 1 or args.mfu is not None and not 0 < args.mfu <= 1:
        parser.error(f"--gpus must be >= 1 and --mfu in (0, 1]; got {args.gpus} and {args.mfu}")
    mfu = args.mfu or DEFAULT_MFU
    spec = ALL_RECIPES[args.recipe]
    modes = {stage: args.checkpointing[0] if args.checkpointing else spec.checkpointing_of(stage)
             for stage in args.stages}
    named = (modes[args.stages[0]] if len(set(modes.values())) == 1
             else ", ".join(f"{m} ({s})" for s, m in modes.items()))
    trained = [s for s in args.stages if s in spec.unfreeze_vision]
    stages = {s.stage: s for s in plan(args.recipe, args.gpus, args.gpu, {st: mfu for st, _ in STAGES})}
    print(f"{args.recipe} on {args.gpus}x {args.gpu}: one optimizer step under FlopCounterMode (fake tensors), "
          f"fastllava with activation checkpointing {named}, the reference as "
          f"{'LLaVA-NeXT' if spec.pinpoints else 'LLaVA'} trains (FlashAttention-2, gradient checkpointing"
          f"{', padded batches of 4' if spec.pinpoints else ''})"
          f"{'; the vision tower trained in ' + ', '.join(trained) if trained else ''}; "
          f"wall clock = executed FLOPs / (GPUs x peak x {mfu:.2f})\n")
    print("| stage | useful TFLOP/step | fastllava executed / useful | reference executed / useful "
          "| fastllava projected | reference projected |")
    print("|---|---|---|---|---|---|")
    audits = []
    for stage in args.stages:
        pack = (args.pack_tokens or [spec.pack[stage]])[0]
        audit = audit_flops(spec.config(stage), stage, world=args.gpus, max_tokens=pack, checkpointing=modes[stage],
                            unfreeze_vision=stage in spec.unfreeze_vision)
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
    spec = ALL_RECIPES[args.recipe]
    # One plan per stage: an AnyRes recipe's stages differ in architecture (stage align is fixed-resolution).
    for stage in stages:
        report, _ = memplan.memory_plan(spec.config(stage), world=args.gpus, memory_gib=memory, margin=args.margin,
                                        stages=[stage], pack_tokens=packs, lora_rank=args.lora,
                                        checkpointing=args.checkpointing or memplan.CHECKPOINTING,
                                        replicate=args.replicate, full_depth=args.full_depth,
                                        unfreeze_vision=spec.unfreeze_vision,
                                        others={g.name: g.memory_gib for g in GPUS if g.name != args.gpu})
        print(report, flush=True)


if __name__ == "__main__":
    main()
