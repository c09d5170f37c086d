"""Varlen attention microbenchmarks (pytest-benchmark): our Triton kernel against torch's baselines.

    python -m pytest benchmarks/bench_attention.py --benchmark-only [-k "7b and mix665k"]

GPU: LLaVA-7B (32 heads, D=128) and 13B (40 heads, D=128), and the GQA ratios of the newer decoders:
gqa-28x4 (Qwen2.5-7B, 7:1) and gqa-32x8 (Llama-3.1-8B, Mistral-7B, Qwen3-8B; 4:1), D=128; bf16, causal,
packs of 16K tokens: uniform samples of 512, 2048 or 8192 tokens, and a pack of fastllava.data.profile's
modelled llava_v1_5_mix665k lengths (<= 2048 each), filled in order until the next sample would overflow.
CPU: a tiny model (4 heads, D=64; and 4 query heads on 2 KV heads) on packs of 512 tokens (mix665k lengths
scaled by 512/16K), fp32.

Providers: triton (ours, CUDA only: the CPU interpreter is not worth timing); torch (our CPU backend:
samples padded into one SDPA call); reference (the per-sample SDPA loop the tests use as oracle);
torch_varlen (torch.nn.attention.varlen.varlen_attn, CUDA); sdpa_padded (the pack unpacked into a
right-padded (B, H, Lmax, D) batch outside the timing, SDPA restricted to its flash backend on CUDA,
the way a padded trainer runs); flex (FlexAttention with a causal same-sample block mask,
torch.compile'd, CUDA); flash_attn and xformers (if installed, CUDA). A provider that cannot run here is
skipped with the reason.
Modes: fwd, and fwd+bwd (forward then backward of a random output gradient).
FLOPs (extra_info["flops"]): causal useful work, the same for every provider, so padded and packed runs
compare, counted by fastllava.flops.attention_flops (the convention of the whole project: forward
2 * sum(l^2) * H * D, backward 2x the forward, fwd+bwd 3x). FlashAttention-2's benchmark counts the
backward as 2.5x (its recomputed Q K^T): its fwd+bwd TFLOP/s for the same time are 3.5/3 = 1.17x ours.
"""

from __future__ import annotations

import pytest
import torch

from fastllava.flops import attention_flops
from fastllava.extras import MissingExtra
from fastllava.ops.varlen_attention import varlen_attention, varlen_attention_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOKENS = 16384 if CUDA else 512
DTYPE = torch.bfloat16 if CUDA else torch.float32
# query heads, KV heads, head dim
MODELS = ({"7b": (32, 32, 128), "13b": (40, 40, 128), "gqa-28x4": (28, 4, 128), "gqa-32x8": (32, 8, 128)} if CUDA
          else {"tiny": (4, 4, 64), "tiny-gqa": (4, 2, 64)})
PACKS = ("uniform-512", "uniform-2048", "uniform-8192", "mix665k") if CUDA else ("uniform-128", "mix665k")
PROVIDERS = ("triton", "torch", "reference", "torch_varlen", "sdpa_padded", "flex", "flash_attn", "xformers")
CUDA_ONLY = {"triton", "torch_varlen", "flex", "flash_attn", "xformers"}
MODES = ("fwd", "fwd+bwd")


def pack_lengths(kind: str, tokens: int = TOKENS) -> list[int]:
    """Sample lengths of one pack of at most `tokens` tokens."""
    if kind.startswith("uniform"):
        n = int(kind.split("-")[1])
        return [n] * max(1, tokens // n)
    from fastllava.data.profile import sample_lengths  # the modelled 665K mix

    scale = 16384 / tokens  # the CPU pack keeps the mix's shape at 1/32 of its lengths
    pack = []
    for n in sample_lengths("mix665k", n=4 * 16384 // 256, seed=0)[0].tolist():
        n = max(1, round(n / scale))
        if sum(pack) + n > tokens:
            break
        pack.append(n)
    return pack


def setup(lengths: list[int], heads: int, dim: int, kv_heads: int | None = None, device=DEVICE, dtype=DTYPE):
    """The inputs every provider shares: packed q (T, Hq, D), k and v (T, Hkv, D) requiring grad (Hkv =
    kv_heads, default Hq), cu_seqlens, max_seqlen."""
    g = torch.Generator(device).manual_seed(0)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, dim, device=device, dtype=dtype, generator=g).requires_grad_()
               for h in (heads, kv_heads or heads, kv_heads or heads))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k, v, cu, max(lengths)


def provider_forward(provider: str, q, k, v, cu, max_len):
    """(forward, leaves): a zero-argument forward of `provider` on the pack, its own layout prepared here
    (outside the timing), and the leaf tensors its backward writes gradients to."""
    if provider in ("triton", "torch", "torch_varlen", "flash_attn", "xformers"):
        return (lambda: varlen_attention(q, k, v, cu, max_len, causal=True, backend=provider)), (q, k, v)
    if provider == "reference":
        return (lambda: varlen_attention_reference(q, k, v, cu, max_len, causal=True)), (q, k, v)
    lengths = cu.diff().tolist()
    if provider == "sdpa_padded":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        B, D = len(lengths), q.shape[2]
        gqa = k.shape[1] != q.shape[1]
        pos = torch.cat([torch.arange(n, device=q.device) for n in lengths])
        row = torch.repeat_interleave(torch.arange(B, device=q.device), torch.tensor(lengths, device=q.device))
        padded = []
        for x in (q, k, v):
            p = x.new_zeros(B, max_len, x.shape[1], D)
            p[row, pos] = x.detach()
            padded.append(p.transpose(1, 2).requires_grad_())

        def run():
            if not CUDA:  # CPU: SDPA's own choice
                return torch.nn.functional.scaled_dot_product_attention(*padded, is_causal=True, enable_gqa=gqa)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(*padded, is_causal=True, enable_gqa=gqa)
        return run, padded
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                      torch.tensor(lengths, device=q.device))

        def same_sample_causal(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        T = q.shape[0]
        block_mask = create_block_mask(same_sample_causal, None, None, T, T, device=q.device)
        q4, k4, v4 = (x.detach().transpose(0, 1).unsqueeze(0).requires_grad_() for x in (q, k, v))
        gqa = k.shape[1] != q.shape[1]
        return (lambda: _compiled_flex()(q4, k4, v4, block_mask=block_mask, enable_gqa=gqa)), (q4, k4, v4)
    raise AssertionError(provider)


_FLEX = []


def _compiled_flex():
    """One torch.compile'd flex_attention for the whole session (FlexAttention is slow uncompiled)."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention))
    return _FLEX[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model, pack", [(m, p) for m in MODELS for p in PACKS], ids=lambda x: x)
def test_attention(measure, model, pack, provider, mode):
    if provider in CUDA_ONLY and not CUDA:
        pytest.skip(f"{provider}: CUDA only")
    heads, kv_heads, dim = MODELS[model]
    lengths = pack_lengths(pack)
    q, k, v, cu, max_len = setup(lengths, heads, dim, kv_heads)
    forward, leaves = provider_forward(provider, q, k, v, cu, max_len)
    try:
        out = forward()
    except MissingExtra as e:  # flash_attn or xformers, not installed here
        pytest.skip(str(e))
    pairs = sum(n * n for n in lengths)
    flops = attention_flops(heads, dim, pairs, causal=True)
    if mode == "fwd":
        fn = forward
    else:
        flops += attention_flops(heads, dim, pairs, causal=True, backward=True)
        grad = torch.randn_like(out)

        def fn():
            torch.autograd.backward(forward(), grad)
    del out
    measure(fn, group=f"attention {model} {pack} {mode}", flops=flops, grads_of=leaves, tokens=sum(lengths),
            samples=len(lengths), max_seqlen=max_len, heads=heads, kv_heads=kv_heads, head_dim=dim,
            dtype=str(DTYPE).split(".")[-1])
