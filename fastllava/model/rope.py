"""Rotary position embeddings for LLaMA checkpoints: default, linear, dynamic (NTK) and llama3 scaling.

Positions come from PackedBatch.position_ids, which restart at 0 for every sample, so each sample is
rotated exactly as if it were alone. Shape legend: T tokens, H heads, D head dim.
"""

from __future__ import annotations

import math

import torch

from .config import TextConfig


def inverse_frequencies(cfg: TextConfig, seq_len: int | None = None) -> torch.Tensor:
    """(D/2,) float32 inverse frequencies. `seq_len` matters only for dynamic scaling."""
    dim = cfg.attention_head_dim
    base = cfg.rope_theta
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "dynamic" and seq_len is not None:
        max_pos = cfg.max_position_embeddings
        factor = scaling["factor"]
        seq_len = max(seq_len, max_pos)
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rotary_cos_sin(cfg: TextConfig, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (T, D) for the packed positions, in `dtype` (as transformers casts them).

    Reads no value on the host except with dynamic (NTK) scaling, which needs each sample's length."""
    device = position_ids.device
    inv_freq = inverse_frequencies(cfg).to(device)
    freqs_TD2 = position_ids.float()[:, None] * inv_freq[None, :]
    if (cfg.rope_scaling or {}).get("rope_type") == "dynamic":
        # NTK-aware scaling depends on each sample's own length (transformers computes it per forward).
        # The one host read left in the model's forward (a sync per micro-step on a GPU), on this rare
        # path only: LLaVA-1.5's LLaMA/Vicuna checkpoints use default RoPE. The per-sample bases are
        # computed in Python floats, as transformers does, so parity stays bitwise.
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end - start > cfg.max_position_embeddings:
                sample_freq = inverse_frequencies(cfg, seq_len=end - start).to(device)
                freqs_TD2[start:end] = position_ids[start:end].float()[:, None] * sample_freq[None, :]
    emb_TD = torch.cat([freqs_TD2, freqs_TD2], dim=-1)
    return emb_TD.cos().to(dtype), emb_TD.sin().to(dtype)


def apply_rotary(x_THD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (T, H, D) by the tables cos, sin (T, D) of their positions (the same for
    every head), LLaMA's half-split convention: x * cos + rotate_half(x) * sin. Returns (T, H, D)."""
    half = x_THD.shape[-1] // 2
    rotated = torch.cat([-x_THD[..., half:], x_THD[..., :half]], dim=-1)
    return x_THD * cos_TD[:, None, :] + rotated * sin_TD[:, None, :]
