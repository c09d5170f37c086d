"""Sequence-packed (varlen) attention: causal inside each sample, never across samples.

Shapes: T packed tokens, B samples, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import pick_backend

BACKENDS = ("torch",)


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None):
    """Per-sample scaled_dot_product_attention. q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        q_HLD = q[start:end].transpose(0, 1)
        k_HLD = k[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        v_HLD = v[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        o_HLD = F.scaled_dot_product_attention(q_HLD, k_HLD, v_HLD, is_causal=causal, scale=scale)
        out[start:end] = o_HLD.transpose(0, 1)
    return out


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None, backend="auto"):
    """Attention over packed samples.

    q: (T, Hq, D), k and v: (T, Hkv, D), same dtype and device; cu_seqlens: (B + 1,) int32,
    cu_seqlens[0] = 0, cu_seqlens[-1] = T; max_seqlen: int, the longest sample.
    Returns (T, Hq, D).
    """
    which = pick_backend(backend, q, BACKENDS, op="varlen_attention")
    if which == "torch":
        return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=softmax_scale)
    raise AssertionError(which)
