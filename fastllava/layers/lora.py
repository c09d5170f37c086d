"""LoRA (Hu et al. 2021) on the decoder's linear layers: a frozen weight plus a trained low-rank update.

`LoRALinear` keeps the base layer's `weight` and `bias` under their own names (the same Parameter
objects), so checkpoints, sharded loading and the export's key mapping do not change; the adapters are
two more parameters, `lora_a` (r, in) and `lora_b` (out, r):

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

`apply_lora` swaps them in before FSDP2 wraps the model (adapters shard with their decoder block);
`init_lora_` gives every adapter its starting value after the model is materialized and loaded (A
Kaiming-uniform as nn.Linear and PEFT start it, B zero, so the first forward is the base model's), from
one generator so every rank draws the same full tensors; a sharded model passes the function that keeps
a rank's shard of them (train/sharded_load.py `copy_full_`).
LLaVA-1.5's finetune_lora.sh: r 128, alpha 256, dropout 0.05, every linear layer of the LLM but the LM head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The decoder's linear layers (fastllava/model/llama.py): LLaVA's find_all_linear_names minus the vision
# tower, projector and LM head, i.e. all of them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """nn.Linear (in_features -> out_features) with a rank-`rank` update scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        # fp32 like every trainable parameter (FSDP2 needs one dtype among a unit's trainable parameters);
        # on the base's device, so a meta model's adapters are materialized with it.
        # A valid start even before init_lora_ (which a run calls after loading): drawn on the host from a
        # generator of its own, so building a model never moves the global RNG.
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(0))
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty_like(a, device=device) if device.type == "meta" else a.to(device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The update to the weight, (alpha / r) B A (out, in), from full adapter tensors, in fp32."""
        return self.scale * (b.float() @ a.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets=LORA_TARGETS) -> list[str]:
    """Replace every nn.Linear of `model.language_model` whose attribute name is in `targets` by a
    LoRALinear around it, in place; returns the replaced modules' names. Call before `parallelize`."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(f"lora.targets: {unknown or 'empty'}; choose among {list(LORA_TARGETS)}")
    replaced = []
    for name, module in list(model.language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                replaced.append(".".join(filter(None, ("language_model", name, child_name))))
    return replaced


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear of every adapted layer (names as model.named_modules gives them)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's."""
    return name.endswith((".lora_a", ".lora_b"))


@torch.no_grad()
def init_lora_(model: nn.Module, seed: int, copy_full_=None) -> None:
    """Every adapter's starting value: A Kaiming-uniform (a = sqrt(5)), B zero. The full tensors are drawn
    from one generator in module order on the host, so any number of ranks starts from the same adapters.

    copy_full_(param, full): how a parameter takes its full value; default a plain copy. A sharded model
    passes train/sharded_load.py's, which keeps only the rank's shard (layers/ know no FSDP)."""
    copy_full_ = copy_full_ or _copy_full_
    gen = torch.Generator().manual_seed(seed)
    for module in lora_modules(model).values():
        full_a = torch.empty(module.lora_a.shape)
        nn.init.kaiming_uniform_(full_a, a=math.sqrt(5), generator=gen)
        copy_full_(module.lora_a, full_a)
        copy_full_(module.lora_b, torch.zeros(module.lora_b.shape))


def _copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    param.copy_(full.to(param.device, param.dtype))
