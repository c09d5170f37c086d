"""Weight initialization for models trained from scratch: the one set of rules every module follows.

Checkpoints overwrite all of it; it matters for `Llava.from_config` (tests, tiny models trained from scratch)
and for the new projector of stage 1.

- Transformer weights (vision tower, decoder, LM head, vision layers a checkpoint would carry): normal with
  std 0.02 (CLIP's and LLaMA's `initializer_range`), norm scales 1, biases and norm shifts 0.
- The projector: PyTorch's nn.Linear default (Kaiming-uniform weights with a = sqrt(5), uniform biases in
  +-1/sqrt(fan_in)), which is how LLaVA's stage 1 starts its new `mm_projector`.
- AnyRes's image_newline: normal with std 1/sqrt(hidden size), as LLaVA-NeXT draws it when stage 2 starts.
Every draw comes from one torch.Generator, in parameter order, so a seed gives the same model everywhere.
"""

from __future__ import annotations

import math

import torch
from torch import nn

STD = 0.02


@torch.no_grad()
def init_transformer_(module: nn.Module, generator: torch.Generator, std: float = STD) -> None:
    """Initialize every parameter of `module` in place by its name: "norm" scales 1 and shifts 0, other
    biases 0, everything else normal(0, std)."""
    for name, p in module.named_parameters():
        if "norm" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_projector_(linears: nn.ModuleList, generator: torch.Generator) -> None:
    """nn.Linear's own default initialization of each (out, in) layer, drawn from `generator`."""
    for linear in linears:
        nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(linear.in_features)
        nn.init.uniform_(linear.bias, -bound, bound, generator=generator)


@torch.no_grad()
def init_image_newline_(newline: torch.Tensor, generator: torch.Generator) -> None:
    """LLaVA-NeXT's draw (llava_arch.py initialize_vision_modules) of the (D,) newline: normal(0, 1/sqrt(D))."""
    newline.normal_(0.0, newline.shape[-1] ** -0.5, generator=generator)
