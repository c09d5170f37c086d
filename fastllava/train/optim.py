"""AdamW with the reference's parameter groups, transformers' learning-rate schedules, gradient clipping.

Groups as in LLaVA / LLaVA-NeXT's trainer (llava_trainer.py create_optimizer): weight decay on matrices only
(no decay on biases and norm weights, i.e. any parameter with fewer than 2 dimensions), and a separate learning
rate for each module that has one set: the projector (`optim.projector_lr`, LLaVA's mm_projector_lr) and the
vision tower (`optim.vision_lr`, LLaVA-NeXT's mm_vision_tower_lr). Everything else trains at `optim.lr`. Only
trainable parameters enter the optimizer, so frozen ones get no state at all. The schedule (a LambdaLR)
scales every group's own lr by the same factor.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..config import OptimConfig

# The modules that may have a learning rate of their own: group name -> (OptimConfig field, parameter-name
# prefix in fastllava's Llava). In this order after the "model" group: a checkpoint's groups are matched by
# position on resume (train/checkpoint.py), so the order never changes.
MODULE_LRS = {"projector": ("projector_lr", "projector."), "vision": ("vision_lr", "vision_tower.")}


def _under(name: str, prefix: str) -> bool:
    # Names under FSDP2 stay those of the unwrapped model (fully_shard does not rename); a wrapper (activation
    # checkpointing, another layout's outer module) may put parts before the prefix.
    return name.startswith(prefix) or f".{prefix}" in name


def param_groups(model: nn.Module, cfg: OptimConfig, prefixes: dict[str, str] | None = None) -> list[dict]:
    """Split the trainable parameters of `model` into groups (module) x (decay or not), named "model",
    "projector" or "vision", with "_no_decay" for the parameters without weight decay. A module whose lr
    (MODULE_LRS) is None stays in "model". prefixes: group name -> parameter-name prefix, for another layout
    (default MODULE_LRS's, fastllava's Llava). Empty groups are left out."""
    prefixes = {k: prefix for k, (_, prefix) in MODULE_LRS.items()} | (prefixes or {})
    lrs = {"model": cfg.lr} | {k: getattr(cfg, key) for k, (key, _) in MODULE_LRS.items()
                               if getattr(cfg, key) is not None}
    order = list(lrs)  # "model" first, then MODULE_LRS's order
    groups: dict[tuple[int, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = next((k for k in order[1:] if _under(name, prefixes[k])), "model")
        groups.setdefault((order.index(module), p.dim() >= 2), []).append(p)
    out = []
    for (i, decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": lrs[order[i]],
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": order[i] + ("" if decay else "_no_decay"),
        })
    if not out:
        raise ValueError("no trainable parameters: check train.stage and the freezing rules")
    return out


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    """One line naming each group with its peak lr (the schedule's base), weight decay and element count."""
    parts = [f"{g['name']} lr {g.get('initial_lr', g['lr']):.3g} wd {g['weight_decay']:g} "
             f"({sum(p.numel() for p in g['params']):,})" for g in optimizer.param_groups]
    return "optimizer groups: " + ", ".join(parts)


def module_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current lr of each module ("model", "projector", "vision"), as the schedule set it."""
    return {g["name"].removesuffix("_no_decay"): g["lr"] for g in optimizer.param_groups}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in param_groups(model, cfg)."""
    groups = param_groups(model, cfg)
    # foreach is the fast path that also handles DTensor (FSDP2) parameters; fused needs CUDA.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """transformers' schedule (a torch LambdaLR): linear warmup over ceil(warmup_ratio * total_steps) steps
    from lr 0 at step 0, as the reference's HF Trainer, then cosine / linear decay to 0, or constant."""
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if cfg.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    make = get_cosine_schedule_with_warmup if cfg.schedule == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, warmup, total_steps)


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global L2 norm of the gradients of `params`, clipped to `max_norm` if > 0 (torch's clip_grad_norm_,
    which reduces FSDP2's sharded DTensor gradients over ranks); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
    if isinstance(norm, DTensor):  # under FSDP2: the reduction over ranks happens here
        norm = norm.full_tensor()
    return float(norm)
