"""The vision-to-language projector: `linear` (LLaVA) or `mlpNx_gelu` (LLaVA-1.5 uses mlp2x_gelu).

Weights stay in nn.Linear layout so checkpoints load unchanged. The two-layer case runs through
fastllava.ops.fused_mlp_projector (a Triton kernel on CUDA with `backend="auto"`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import fused_mlp_projector


class Projector(nn.Module):
    """Vision features (N, in_features) -> LLM embeddings (N, out_features), N visual tokens.

    depth 1 is LLaVA's `linear`; depth k >= 2 is `mlpkx_gelu`: k Linear layers (in -> out, then out -> out)
    with exact GELU between them. `linears[i]` are plain nn.Linear, so checkpoints load unchanged.
    backend: fastllava.ops.fused_mlp_projector's, for the two-layer case.
    """

    def __init__(self, in_features: int, out_features: int, depth: int, *, backend: str = "auto"):
        super().__init__()
        dims = [in_features] + [out_features] * depth
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in_features) or (..., in_features) -> (N, out_features), in x's dtype."""
        if len(self.linears) == 2:
            first, second = self.linears
            return fused_mlp_projector(x, first.weight, first.bias, second.weight, second.bias, backend=self.backend)
        for i, linear in enumerate(self.linears):
            x = linear(x if i == 0 else F.gelu(x))
        return x
