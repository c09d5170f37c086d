"""Kernels: each op has a torch reference and a Triton kernel; `backend="auto"` picks by device."""

from .decode_attention import decode_attention
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .fused_mlp_projector import fused_mlp_projector
from .merge_visual_tokens import merge_visual_tokens
from .varlen_attention import varlen_attention

__all__ = [
    "decode_attention", "fused_linear_cross_entropy", "fused_mlp_projector", "merge_visual_tokens", "varlen_attention",
]
