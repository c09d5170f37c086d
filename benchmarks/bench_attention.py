"""Varlen attention throughput at LLaVA shapes: our Triton kernel against torch's baselines.

    python benchmarks/bench_attention.py [--tokens 16384] [--models 7b 13b] [--modes fwd bwd fwd+bwd]

Packs of --tokens tokens (default 16K): uniform samples of 512, 2048 or 8192 tokens, and a mix drawn
from fastllava.data.profile's modelled llava_v1_5_mix665k lengths (<= 2048 tokens each), filled
in order until the next sample would overflow the pack.

Backends: triton (ours), torch_varlen (torch.nn.attention.varlen.varlen_attn), sdpa_padded (the pack
unpacked into a right-padded (B, H, Lmax, D) batch, SDPA restricted to its flash backend, the way a
padded trainer runs), flex (FlexAttention, causal + same-document block mask, torch.compile'd).
FLOP convention (causal, useful work only, so padded and packed runs are comparable):
forward = 4 * sum(l^2) * H * D / 2, backward = 2.5 x forward, fwd+bwd = 3.5 x forward.
Timing: triton.testing.do_bench (median ms) after its warm-up, on random bf16 data. Prints a markdown table.
On a machine without CUDA it prints that there is no GPU and what it would compare, and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastllava.ops import varlen_attention

MODELS = {"7b": (32, 128), "13b": (40, 128)}  # query heads (= KV heads in LLaMA-1/2 7B/13B), head dim
BACKENDS = ("triton", "torch_varlen", "sdpa_padded", "flex")
MODES = ("fwd", "bwd", "fwd+bwd")


def pack_lengths(kind: str, tokens: int) -> list[int]:
    if kind.startswith("uniform"):
        n = int(kind.split("-")[1])
        return [n] * max(1, tokens // n)
    from fastllava.data.profile import sample_lengths  # the modelled 665K mix (data helper's module)

    pack = []
    for n in sample_lengths("mix665k", n=4 * tokens // 256, seed=0)[0].tolist():
        if sum(pack) + n > tokens:
            break
        pack.append(n)
    return pack


def setup(lengths: list[int], heads: int, dim: int, device="cuda", dtype=torch.bfloat16):
    """The shared inputs of every backend: packed q, k, v (T, H, D), cu_seqlens, max_seqlen."""
    T = sum(lengths)
    q, k, v = (torch.randn(T, heads, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k, v, cu, max(lengths)


def make_fn(backend: str, q, k, v, cu, max_len):
    """A zero-argument forward for `backend` on the packed inputs (its own layout prepared outside)."""
    if backend in ("triton", "torch_varlen"):
        return lambda: varlen_attention(q, k, v, cu, max_len, causal=True, backend=backend)
    lengths = cu.diff().tolist()
    if backend == "sdpa_padded":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        B, H, D = len(lengths), q.shape[1], q.shape[2]
        pos = torch.cat([torch.arange(n, device=q.device) for n in lengths])
        row = torch.repeat_interleave(torch.arange(B, device=q.device), torch.tensor(lengths, device=q.device))
        padded = []
        for x in (q, k, v):
            p = x.new_zeros(B, max_len, H, D).detach()
            p[row, pos] = x.detach()
            padded.append(p.transpose(1, 2).requires_grad_())

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(*padded, is_causal=True)
        return run
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                      torch.tensor(lengths, device=q.device))

        def mask(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        T = q.shape[0]
        block_mask = create_block_mask(mask, None, None, T, T, device=q.device)
        flex = torch.compile(flex_attention)
        q4, k4, v4 = (x.detach().transpose(0, 1).unsqueeze(0).requires_grad_() for x in (q, k, v))
        return lambda: flex(q4, k4, v4, block_mask=block_mask)
    raise ValueError(backend)


def measure(backend, mode, q, k, v, cu, max_len) -> float:
    from triton.testing import do_bench

    fwd = make_fn(backend, q, k, v, cu, max_len)
    if mode == "fwd":
        return do_bench(fwd)
    do = torch.randn_like(fwd())
    if mode == "bwd":
        out = fwd()
        return do_bench(lambda: out.backward(do, retain_graph=True), grad_to_none=[q, k, v])
    return do_bench(lambda: fwd().backward(do), grad_to_none=[q, k, v])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--packs", nargs="+", default=["uniform-512", "uniform-2048", "uniform-8192", "mix665k"])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("No GPU: nothing measured. On a CUDA device this compares, in TFLOP/s (bf16, causal):")
        print(f"  backends {', '.join(args.backends)}; modes {', '.join(args.modes)}")
        print(f"  models {', '.join(f'{m} (H={MODELS[m][0]}, D={MODELS[m][1]})' for m in args.models)}; "
              f"packs of {args.tokens} tokens: {', '.join(args.packs)}")
        return 0
    rows = ["| model | pack | samples | mode | " + " | ".join(args.backends) + " |",
            "|---|---|---|---|" + "---|" * len(args.backends)]
    for model in args.models:
        H, D = MODELS[model]
        for pack in args.packs:
            lengths = pack_lengths(pack, args.tokens)
            fwd_flops = 4 * sum(n * n for n in lengths) * H * D / 2
            q, k, v, cu, max_len = setup(lengths, H, D)
            for mode in args.modes:
                flops = fwd_flops * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
                cells = []
                for backend in args.backends:
                    try:
                        ms = measure(backend, mode, q, k, v, cu, max_len)
                        cells.append(f"{flops / ms / 1e9:.0f}")
                    except Exception as e:  # a missing baseline should not hide the others
                        cells.append(f"n/a ({type(e).__name__})")
                        print(f"{backend} {model} {pack} {mode}: {e}", file=sys.stderr)
                rows.append(f"| {model} | {pack} | {len(lengths)} | {mode} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    print(f"\nTFLOP/s, {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, causal; "
          "forward FLOPs = 2 * sum(l^2) * H * D, backward 2.5x\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
