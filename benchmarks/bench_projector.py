"""Fused MLP projector microbenchmarks (pytest-benchmark): ours against eager PyTorch and torch.compile.

    python -m pytest benchmarks/bench_projector.py --benchmark-only

GPU: 16 and 64 images x 576 tokens, CLIP-L features (Din=1024) -> 4096 -> 4096 (7B) and -> 5120 -> 5120
(13B); 16 images x 729 tokens of SigLIP-SO400M (Din=1152) -> 3584 (Qwen2.5-7B) and -> 4096; bf16. CPU: 32 tokens, 64 -> 128 -> 128, fp32, eager only (triton and compile are timed on CUDA).
Features frozen (no dx), weights trained: the stage-1 and stage-2 case.
Providers: triton (ours), eager (fused_mlp_projector_reference), compile (torch.compile of that
reference, static shapes). Modes: fwd, fwd+bwd.
FLOPs (extra_info["flops"]): fastllava.flops.mlp_projector_flops, the op's own FLOP formula: forward
2 N (Din Dh + Dh Dout); the backward without dx adds dA = dy w2, dW2 = dy^T a and dW1 = dh^T x.
"""

from __future__ import annotations

import pytest
import torch

from fastllava.flops import mlp_projector_flops
from fastllava.ops.fused_mlp_projector import fused_mlp_projector, fused_mlp_projector_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# name -> (N tokens, Din, Dh = Dout)
SHAPES = ({**{f"{i}img-{dh}": (i * 576, 1024, dh) for i in (16, 64) for dh in (4096, 5120)},
           **{f"16img-siglip-{dh}": (16 * 729, 1152, dh) for dh in (3584, 4096)}} if CUDA
          else {"tiny": (32, 64, 128)})
PROVIDERS = ("triton", "eager", "compile")
MODES = ("fwd", "fwd+bwd")


def setup(n_tokens: int, din: int, dh: int, dtype=DTYPE, device=DEVICE):
    """x (N, Din) frozen; w1 (Dh, Din), b1 (Dh,), w2 (Dh, Dh), b2 (Dh,) trained; dy (N, Dh) random."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(n_tokens, din, device=device, generator=g).to(dtype)
    w1 = (torch.randn(dh, din, device=device, generator=g) / din**0.5).to(dtype).requires_grad_()
    b1 = (torch.randn(dh, device=device, generator=g) * 0.1).to(dtype).requires_grad_()
    w2 = (torch.randn(dh, dh, device=device, generator=g) / dh**0.5).to(dtype).requires_grad_()
    b2 = (torch.randn(dh, device=device, generator=g) * 0.1).to(dtype).requires_grad_()
    dy = torch.randn(n_tokens, dh, device=device, generator=g).to(dtype)
    return x, [w1, b1, w2, b2], dy


def projector_flops(n: int, din: int, dh: int, mode: str) -> int:
    """Frozen features: no dx GEMM in the backward."""
    forward = mlp_projector_flops(n, din, dh, dh)
    return forward if mode == "fwd" else forward + mlp_projector_flops(n, din, dh, dh, backward=("da", "dw2", "dw1"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_projector(measure, provider_fn, shape, provider, mode):
    op = provider_fn(provider, fused_mlp_projector, fused_mlp_projector_reference)
    n, din, dh = SHAPES[shape]
    x, params, dy = setup(n, din, dh)

    def forward():
        return op(x, *params)
    fn = forward if mode == "fwd" else (lambda: torch.autograd.backward(forward(), dy))
    measure(fn, group=f"projector {shape} {mode}", flops=projector_flops(n, din, dh, mode), grads_of=params,
            tokens=n, din=din, dh=dh, dout=dh, dtype=str(DTYPE).split(".")[-1])
