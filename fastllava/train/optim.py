"""AdamW with the reference's parameter groups, the learning-rate schedule, and gradient clipping.

Groups as in LLaVA / HF Trainer: weight decay on matrices only (no decay on biases and norm weights,
i.e. any parameter with fewer than 2 dimensions), and an optional separate learning rate for the
projector. Only trainable parameters enter the optimizer, so frozen ones get no state at all.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

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
        lr = cfg.projector_lr if is_projector else cfg.lr
        out.append({
            "params": params,
            "lr": lr,
            "initial_lr": lr,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": ("projector" if is_projector else "model") + ("" if decay else "_no_decay"),
        })
    if not out:
        raise ValueError("no trainable parameters: check train.stage and the freezing rules")
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    # foreach is the fast path that also handles DTensor (FSDP2) parameters; fused needs CUDA.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=True)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based), as in HF's
    get_cosine_schedule_with_warmup: linear warmup over ceil(warmup_ratio * total) steps, then decay."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return step / warmup  # step 0 runs at lr 0, exactly as the reference's HF scheduler
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(progress, 1.0)
    if cfg.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global L2 norm of the gradients of `params` (FSDP2 shards included), clipped to `max_norm` if > 0.

    Each rank sums the squares of its local shards; one all-reduce gives the global sum. Written out
    rather than torch.nn.utils.clip_grad_norm_ so the sharded and unsharded cases run the same code on
    every torch version we support.
    """
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    # Sharded (DTensor) gradients: each rank holds a disjoint piece, so the squares are summed over
    # ranks; plain gradients are whole on every rank and are counted once.
    sq_sharded = torch.zeros((), device=device)
    sq_plain = torch.zeros((), device=device)
    locals_ = []
    for g in grads:
        if hasattr(g, "to_local"):
            g = g.to_local()
            sq_sharded += g.detach().float().pow(2).sum()
        else:
            sq_plain += g.detach().float().pow(2).sum()
        locals_.append(g)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq_sharded)
    sq = sq_sharded + sq_plain
    norm = float(sq.sqrt())
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        torch._foreach_mul_(locals_, scale)
    return norm
