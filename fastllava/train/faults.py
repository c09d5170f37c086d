"""What the trainer says and checks when a step goes wrong (issue 23): the packs of a step skipped as not
finite, the stop after `train.max_bad_steps` of them in a row, the refusal to export non-finite weights, and
an out-of-memory error that names the pack size, the checkpointing mode and the memory plan's command.

Each function that reads other ranks' values is a collective that every rank calls at the same point: the
trainer's decisions that lead to them (skip, stop, export) are the same on every rank by construction.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ..config import Config
from ..hardware import detect
from .distributed import DistEnv, all_reduce_sum, gather_interleaved


class NonFiniteError(RuntimeError):
    """Training produced non-finite numbers it cannot go on from: `train.max_bad_steps` skipped steps in a
    row, or non-finite weights at the export. The message names the steps, samples or weights."""


def sample_names(source, indices, limit: int = 8) -> str:
    """Samples by dataset index, with where they come from where the dataset can say (LlavaDataset's
    describe_sample: file entry, id, images); at most `limit`, then how many more."""
    describe = getattr(source, "describe_sample", None)

    def name(i: int) -> str:
        return f"#{i}" if describe is None else f"#{i} ({describe(i)})"

    shown = ", ".join(name(int(i)) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def bad_packs(loader, env: DistEnv, step: int, pack_losses: torch.Tensor) -> str:
    """The packs of skipped step `step` (0-based) whose loss sum was not finite, on every rank, named by
    their samples through `loader`'s plan. pack_losses: (M,) float64, this rank's loss sum per micro-step.
    Collective: every rank calls it for the same steps."""
    mine = [(m, v) for m, v in enumerate(pack_losses.tolist()) if not math.isfinite(v)]
    per_rank = gather_interleaved([mine], env.rank, env.world_size)
    plan = loader.plan(step)
    packs = [f"rank {r} micro-step {m + 1} (loss sum {v}): samples {sample_names(loader.source, plan.rank(r)[m])}"
             for r, bad in enumerate(per_rank) for m, v in bad]
    if packs:
        return "; ".join(packs)
    everything = [i for r in range(env.world_size) for pack in plan.rank(r) for i in pack]
    return (f"every pack's loss was finite, the gradient was not; the step's samples "
            f"{sample_names(loader.source, everything)}")


def give_up_message(streak: list[str], step: int, checkpoint: Path | None) -> str:
    """Why a run stopped at `step` after the skipped steps `streak` (their descriptions), and what to do."""
    good = step - len(streak)
    weights = f"the weights and optimizer state after step {good}" if good else "the initial weights"
    kept = (f"{checkpoint} holds {weights} (the last good ones) and the data position after step {step}"
            if checkpoint else "no checkpoint could be written")
    return (f"{len(streak)} optimizer steps in a row had a non-finite loss or gradient norm (train.max_bad_steps="
            f"{len(streak)}); none of them updated the model. Stopped at step {step}: {kept}. The bad steps: "
            f"{' | '.join(streak)}. Check those samples (a corrupt image, a broken conversation), or lower optim.lr "
            f"if the loss was rising before; checkpoint.resume=auto goes on after these steps.")


def check_finite(model, env: DistEnv) -> None:
    """NonFiniteError naming every non-finite weight of `model`, on every rank (collective). Each rank reads
    its own shards: one pass over the weights, one small all-reduce, a gather only when some are bad."""
    named = list(model.named_parameters())
    local = [p.to_local() if isinstance(p, DTensor) else p for _, p in named]
    flags = torch.stack([~torch.isfinite(t.detach()).all() for t in local]).tolist() if local else []
    mine = [name for (name, _), bad in zip(named, flags) if bad]
    (count,) = all_reduce_sum([len(mine)], env.device)
    if count:
        names = sorted({n for rank in gather_interleaved([mine], env.rank, env.world_size) for n in rank})
        raise NonFiniteError(f"not exported: {len(names)} weight tensor(s) hold NaN or inf values "
                             f"({', '.join(names[:8])}{' ...' if len(names) > 8 else ''}); resume from an earlier "
                             f"checkpoint (checkpoint.resume=PATH) with a lower optim.lr")


# The memory plan's recipes (fastllava/plan.py RECIPES, which train/ does not import) by their decoder's
# (embedding rows, hidden size): the LM head and the width set most of a step's memory, so the recipe nearest
# the model's in both is the plan to run. ANYRES_PLAN_RECIPES (plan.ANYRES_RECIPES) stand in for the
# fixed-resolution recipe of the same decoder when the run is AnyRes: its tiles multiply a sample's image
# tokens and the plan of that recipe models them. tests/train/test_oom_recipe.py holds both tables equal to plan's.
PLAN_RECIPES = {"llava-1.5-7b": (32064, 4096), "llava-1.5-13b": (32064, 5120),
                "llava-1.5-qwen2.5-7b-siglip": (152064, 3584), "llava-1.5-llama3.1-8b": (128320, 4096)}
ANYRES_PLAN_RECIPES = {"llava-next-7b": (32064, 4096)}


def nearest_recipe(vocab_size: int, hidden_size: int, anyres: bool = False) -> str:
    """The PLAN_RECIPES name nearest a decoder of `vocab_size` rows and `hidden_size` width (log distance); for
    an AnyRes model (`anyres`), the ANYRES_PLAN_RECIPES one of that recipe's decoder where there is one."""
    def distance(name):
        rows, width = PLAN_RECIPES[name]
        return abs(math.log(vocab_size / rows)) + abs(math.log(hidden_size / width))

    nearest = min(PLAN_RECIPES, key=distance)
    twins = [name for name, shape in ANYRES_PLAN_RECIPES.items() if shape == PLAN_RECIPES[nearest]]
    return twins[0] if anyres and twins else nearest


def oom_message(cfg: Config, env: DistEnv, where: str, batch=None, config=None) -> str:
    """What an out-of-memory error in `where` says: the pack (a PackedBatch, if one was running) and the
    configuration, the peak on a GPU, what to change, and the memory plan's command (fastllava/plan.py)
    that measures which configuration fits. config: the model's LlavaConfig, whose decoder and AnyRes grid
    pick the plan's nearest recipe (nearest_recipe; LLaVA-1.5-7B's without one)."""
    pack = f"a pack of {batch.num_tokens:,} tokens and {batch.num_images} image(s), " if batch is not None else ""
    peak = ""
    if env.device.type == "cuda":
        used = torch.cuda.max_memory_allocated(env.device)
        total = torch.cuda.get_device_properties(env.device).total_memory
        peak = f"; {used / 2**30:.1f} of {total / 2**30:.1f} GiB allocated at the peak"
    d, par = cfg.data, cfg.parallel
    smaller = max(d.model_max_length, d.max_tokens_per_pack // 2)  # a pack must hold the longest sample
    more_recompute = {"none": "selective", "selective": "full"}.get(par.activation_checkpointing)
    fixes = [f"data.max_tokens_per_pack={smaller}"] if smaller < d.max_tokens_per_pack else []
    fixes += [f"parallel.activation_checkpointing={more_recompute}"] if more_recompute else []
    fixes = " or ".join(fixes) or "more GPUs (FSDP shards weights, gradients and optimizer state over them), or LoRA"
    gpu = detect(env.device)
    recipe = ("llava-1.5-7b" if config is None else
              nearest_recipe(config.text.vocab_size, config.text.hidden_size, config.image_grid_pinpoints is not None))
    packs = " ".join(str(n) for n in sorted({smaller, d.max_tokens_per_pack}))
    command = (f"python -m fastllava.plan --memory --recipe {recipe} --gpus {env.world_size} "
               f"--gpu {gpu.name if gpu else '<GPU>'} --stages {cfg.train.stage} --pack-tokens {packs}"
               + (f" --replicate {par.replicate}" if par.replicate > 1 else "")
               + (f" --lora {cfg.lora.rank}" if cfg.lora.enabled else ""))
    return (f"out of GPU memory in {where} on rank {env.rank}: {pack}data.max_tokens_per_pack={d.max_tokens_per_pack}, "
            f"parallel.activation_checkpointing={par.activation_checkpointing}, {env.world_size} rank(s){peak}. "
            f"Try {fixes}; the memory plan measures each pack size and checkpointing mode of the nearest "
            f"recipe and names the fastest that fits: {command}")


@contextmanager
def explain_oom(cfg: Config, env: DistEnv, where: str, batch=None, config=None):
    """Re-raise torch.OutOfMemoryError inside the block as one with oom_message's account (the original
    chained as its cause)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(oom_message(cfg, env, where, batch, config)) from e
