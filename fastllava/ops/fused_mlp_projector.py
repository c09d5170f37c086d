"""The LLaVA-1.5 projector (mlp2x_gelu): Linear -> exact GELU -> Linear, weights in nn.Linear layout.

Shapes: N visual tokens, Din vision width, Dh = Dout LLM width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import pick_backend

BACKENDS = ("torch",)


def fused_mlp_projector_reference(x, w1, b1, w2, b2):
    """x (N, Din), w1 (Dh, Din), b1 (Dh,), w2 (Dout, Dh), b2 (Dout,) -> (N, Dout)."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def fused_mlp_projector(x, w1, b1, w2, b2, *, backend="auto"):
    """Linear(w1, b1) -> GELU (exact, erf) -> Linear(w2, b2). x (N, Din) -> (N, Dout)."""
    which = pick_backend(backend, x, BACKENDS, op="fused_mlp_projector")
    if which == "torch":
        return fused_mlp_projector_reference(x, w1, b1, w2, b2)
    raise AssertionError(which)
