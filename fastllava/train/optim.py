"""AdamW with the reference's parameter groups, transformers' learning-rate schedules, gradient clipping.

Groups as in LLaVA / HF Trainer: weight decay on matrices only (no decay on biases and norm weights,
i.e. any parameter with fewer than 2 dimensions), and an optional separate learning rate for the
projector. Only trainable parameters enter the optimizer, so frozen ones get no state at all.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig, projector_prefix: str = "projector.") -> list[dict]:
    """Split the trainable parameters of `model` into up to four groups: (projector or not) x (decay or not)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Names under FSDP2 stay those of the unwrapped model (fully_shard does not rename).
        is_projector = cfg.projector_lr is not None and (name.startswith(projector_prefix) or f".{projector_prefix}" in name)
        decay = p.dim() >= 2
        groups.setdefault((is_projector, decay), []).append(p)
    out = []
    for (is_projector, decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": cfg.projector_lr if is_projector else cfg.lr,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": ("projector" if is_projector else "model") + ("" if decay else "_no_decay"),
        })
    if not out:
        raise ValueError("no trainable parameters: check train.stage and the freezing rules")
    return out


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
