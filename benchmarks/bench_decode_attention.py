"""Decode-step attention microbenchmarks (pytest-benchmark): one new token per sequence over its KV cache.

    python -m pytest benchmarks/bench_decode_attention.py --benchmark-only [-k "7b and B64"]

GPU: LLaVA-7B (Hq = Hkv = 32, D=128) and 13B (40 heads, D=128), bf16, B in {1, 16, 64} sequences with
about 700 cached positions each (576 image tokens + a prompt: uniform in 650..750), a cache of
capacity 1024 per slot, slots shuffled. CPU: a tiny model (4 heads, D=64), B in {1, 4}, ~100
positions, fp32.

Providers: triton (ours, CUDA only: the CPU interpreter is not worth timing); torch (the per-row
reference path, our CPU backend); flash_attn (flash_attn_with_kvcache, if installed, CUDA).
Bytes (extra_info["bytes"]), what the step must move at the least: every valid cached key and value
read once (2 * sum(lengths) * Hkv * D elements, which dominates), q read and the output written
(2 * B * Hq * D elements), slots and lengths (8 B per sequence). GB/s and the fraction of the device's
datasheet bandwidth follow from the median time.
"""

from __future__ import annotations

import pytest
import torch

from fastllava.extras import MissingExtra
from fastllava.ops.decode_attention import decode_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# name -> (query heads, key/value heads, head dim)
MODELS = {"7b": (32, 32, 128), "13b": (40, 40, 128)} if CUDA else {"tiny": (4, 4, 64)}
BATCHES = (1, 16, 64) if CUDA else (1, 4)
LENGTHS, CAPACITY = ((650, 750), 1024) if CUDA else ((90, 110), 128)  # lengths drawn from [lo, hi]
PROVIDERS = ("triton", "torch", "flash_attn")
CUDA_ONLY = {"triton", "flash_attn"}


def setup(B: int, Hq: int, Hkv: int, D: int, device=DEVICE, dtype=DTYPE):
    """q (B, Hq, D); k and v caches (B, CAPACITY, Hkv, D), random everywhere; slots a permutation of the B
    slots; lengths drawn from LENGTHS."""
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(B, Hq, D, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(B, CAPACITY, Hkv, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    slots = torch.randperm(B, device=device, generator=g).to(torch.int32)
    lengths = torch.randint(LENGTHS[0], LENGTHS[1] + 1, (B,), device=device, generator=g, dtype=torch.int32)
    return q, k, v, slots, lengths


def decode_bytes(total_len: int, B: int, Hq: int, Hkv: int, D: int, element_size: int) -> int:
    return (2 * total_len * Hkv * D + 2 * B * Hq * D) * element_size + 8 * B


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("model", list(MODELS))
def test_decode_attention(measure, model, B, provider):
    if provider in CUDA_ONLY and not CUDA:
        pytest.skip(f"{provider}: CUDA only")
    Hq, Hkv, D = MODELS[model]
    q, k, v, slots, lengths = setup(B, Hq, Hkv, D)

    def fn():
        return decode_attention(q, k, v, slots, lengths, backend=provider)

    try:
        fn()
    except MissingExtra as e:  # flash_attn, not installed here
        pytest.skip(str(e))
    total = int(lengths.sum())  # outside the timing
    measure(fn, group=f"decode_attention {model} B{B}",
            bytes_moved=decode_bytes(total, B, Hq, Hkv, D, q.element_size()), batch=B, q_heads=Hq, kv_heads=Hkv,
            head_dim=D, cached_tokens=total, capacity=CAPACITY, dtype=str(DTYPE).split(".")[-1])
