"""The KV cache of generation: every layer's post-RoPE keys and values, one slot per running sequence.

Layout: per layer, K and V of shape (S, L, Hkv, Dh): S slots (sequences decoded together), capacity L
positions each. This is the layout of flash-attn's `flash_attn_with_kvcache` (its cache_batch_idx picks
slots), so that backend reads the cache as it is. A slot is contiguous: no paging; a sequence's whole
budget (prompt + max_new_tokens) is reserved when it is admitted, so a step never runs out of room.

A forward writes through a CacheStep: where each of its T tokens goes (slot, position), and whether it
is a decode step (one new token per sequence, attention over the cache) or a prefill (a packed
sequence of whole prompts, attention over the pack itself, keys and values stored for later).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.config import TextConfig


class KVCache:
    """Keys and values for `num_slots` sequences of up to `capacity` positions, every layer."""

    def __init__(self, config: TextConfig, num_slots: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (num_slots, capacity, config.num_key_value_heads, config.attention_head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.num_slots, self.capacity = num_slots, capacity

    @staticmethod
    def nbytes(config: TextConfig, num_slots: int, capacity: int, dtype: torch.dtype) -> int:
        """Memory a cache of this size takes (K and V, every layer)."""
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.attention_head_dim
        return num_slots * capacity * per_token * torch.finfo(dtype).bits // 8


@dataclass
class CacheStep:
    """Where the T tokens of one forward go in the cache.

    slots_T, positions_T: (T,) int64, the slot and position of each token (positions are the tokens'
      position ids: a prompt starts at 0).
    decoding: True for a decode step: token b is the newest token of the sequence in slot slots_T[b] and
      attends over that slot's positions 0..positions_T[b] (itself included); False for a prefill.
    backend: decode attention's backend (fastllava.ops.decode_attention).
    """

    cache: KVCache
    slots_T: torch.Tensor
    positions_T: torch.Tensor
    decoding: bool
    backend: str = "auto"

    def __post_init__(self):
        if self.decoding:  # decode_attention's int32 arguments, made once per step rather than per layer
            self.slots_B = self.slots_T.to(torch.int32)
            self.lengths_B = (self.positions_T + 1).to(torch.int32)

    def layer(self, i: int) -> "CacheLayer":
        """The view layer i stores into and attends over."""
        return CacheLayer(self, i)


@dataclass
class CacheLayer:
    """One layer's view of a CacheStep (what fastllava.model.llama.Attention calls)."""

    step: CacheStep
    index: int

    @property
    def decoding(self) -> bool:
        return self.step.decoding

    def store(self, k_THD: torch.Tensor, v_THD: torch.Tensor) -> None:
        """Write the step's keys and values (T, Hkv, Dh) at their (slot, position)."""
        step = self.step
        step.cache.k[self.index][step.slots_T, step.positions_T] = k_THD.to(step.cache.k[self.index].dtype)
        step.cache.v[self.index][step.slots_T, step.positions_T] = v_THD.to(step.cache.v[self.index].dtype)

    def attend(self, q_BHD: torch.Tensor) -> torch.Tensor:
        """Decode attention of each sequence's new query (B, Hq, Dh) over its cached positions -> (B, Hq, Dh)."""
        from ..ops.decode_attention import decode_attention

        step = self.step
        return decode_attention(q_BHD, step.cache.k[self.index], step.cache.v[self.index], step.slots_B,
                                step.lengths_B, backend=step.backend)
