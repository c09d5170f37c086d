"""LM head + cross-entropy without materializing the (T, V) logits.

Shapes: T tokens, D hidden width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import pick_backend

BACKENDS = ("torch",)


def fused_linear_cross_entropy_reference(hidden, weight, labels, *, ignore_index=-100, reduction="sum"):
    """hidden (T, D), weight (V, D), labels (T,) -> scalar loss; logits in fp32."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="sum", backend="auto"):
    """Cross-entropy of softmax(hidden @ weight.T) against labels (already shifted by the caller).

    hidden: (T, D); weight: (V, D) in nn.Linear layout; labels: (T,) int64 with ignore_index where no loss.
    reduction: "sum" (what global token normalization needs) or "mean" over non-ignored labels.
    Returns a scalar fp32 tensor.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'sum' or 'mean', got {reduction!r}")
    which = pick_backend(backend, hidden, BACKENDS, op="fused_linear_cross_entropy")
    if which == "torch":
        return fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction)
    raise AssertionError(which)
