"""LLaMA-family decoder over a packed sequence: RMSNorm, RoPE, SwiGLU, grouped-query attention. The other
decoder families are this block with optional parts their TextConfig turns on: a bias on q/k/v (Qwen2:
qkv_bias) or on q/k/v/o (attention_bias), an RMSNorm over each head of q and k before RoPE (Qwen3: qk_norm);
Mistral's sliding window is refused past its length (TextConfig.check_length), never attended past.

The forward takes embeddings (T, D) of samples back to back plus position_ids and cu_seqlens;
attention is causal inside each sample and never crosses a boundary (fastllava.ops.varlen_attention).
Generation passes a KV cache (fastllava.generate.kv_cache): each layer stores its post-RoPE keys and values
there, and a decode step attends over the cache instead of over the pack.
Shape legend: T tokens, D model width, Hq query heads, Hkv key/value heads, Dh head dim, F MLP width.
Module names mirror Hugging Face's LlamaModel so checkpoints map key for key.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..layers import RMSNorm
from ..ops import varlen_attention
from .config import TextConfig
from .rope import apply_rotary, rotary_cos_sin


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, causal inside each packed sample (ops.varlen_attention)."""

    def __init__(self, cfg: TextConfig, backend: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attention_head_dim
        d = cfg.hidden_size
        qkv_bias = cfg.qkv_bias or cfg.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=cfg.attention_bias)
        # Qwen3 normalizes each head (width Dh, one weight shared by the heads) before RoPE; without it an
        # Identity keeps the forward free of branches and the parameter names those of the checkpoint.
        norm = (lambda: RMSNorm(self.head_dim, cfg.rms_norm_eps)) if cfg.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.backend = backend

    def forward(self, x_TD, cos_TD, sin_TD, cu_seqlens, max_seqlen, cache_layer=None):
        """x (T, D); rotary tables cos, sin (T, Dh); cu_seqlens (B + 1,) int32; max_seqlen int -> (T, D).

        cache_layer: this layer's view of a KV cache (generation): keys and values are stored there; in a
        decode step (each sample one new token) attention runs over the cache, not over the pack."""
        t = x_TD.shape[0]
        q_THD = apply_rotary(self.q_norm(self.q_proj(x_TD).view(t, self.num_heads, self.head_dim)), cos_TD, sin_TD)
        k_THD = apply_rotary(self.k_norm(self.k_proj(x_TD).view(t, self.num_kv_heads, self.head_dim)), cos_TD, sin_TD)
        v_THD = self.v_proj(x_TD).view(t, self.num_kv_heads, self.head_dim)
        if cache_layer is not None:
            cache_layer.store(k_THD, v_THD)
        if cache_layer is not None and cache_layer.decoding:
            o_THD = cache_layer.attend(q_THD)
        else:
            o_THD = varlen_attention(q_THD, k_THD, v_THD, cu_seqlens, max_seqlen, causal=True, backend=self.backend)
        return self.o_proj(o_THD.reshape(t, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    """LLaMA's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x_TD):
        """(T, D) -> (T, D)."""
        return self.down_proj(F.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TextConfig, attention_backend: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, attention_backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x_TD, cos_TD, sin_TD, cu_seqlens, max_seqlen, cache_layer=None):
        """(T, D) -> (T, D); the other arguments as in Attention.forward."""
        x_TD = x_TD + self.self_attn(self.input_layernorm(x_TD), cos_TD, sin_TD, cu_seqlens, max_seqlen, cache_layer)
        return x_TD + self.mlp(self.post_attention_layernorm(x_TD))


class LlamaDecoder(nn.Module):
    """Embedding table, decoder blocks and final norm; the LM head belongs to Llava (it may be tied)."""

    def __init__(self, cfg: TextConfig, attention_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, attention_backend) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds_TD, position_ids, cu_seqlens, max_seqlen, cache=None):
        """(T, D) input embeddings of a packed sequence -> (T, D) final hidden states.

        cache: a KV-cache step (fastllava.generate.kv_cache.CacheStep) whose `layer(i)` each layer stores
        into and, when decoding, attends over; None in training."""
        # max_seqlen is a host int: the check costs no sync. A decode step (max_seqlen 1) is checked where the
        # cache is made, against the longest sequence it can hold (Generator._new_cache, generate/engine.py).
        self.cfg.check_length(max_seqlen, "the longest sample of the pack")
        cos_TD, sin_TD = rotary_cos_sin(self.cfg, position_ids, cu_seqlens, embeds_TD.dtype)
        x_TD = embeds_TD
        for i, layer in enumerate(self.layers):
            x_TD = layer(x_TD, cos_TD, sin_TD, cu_seqlens, max_seqlen, None if cache is None else cache.layer(i))
        return self.norm(x_TD)
