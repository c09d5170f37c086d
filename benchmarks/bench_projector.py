"""Fused MLP projector vs eager PyTorch and torch.compile: speed, TFLOP/s and peak memory.

    python benchmarks/bench_projector.py

Shapes: 16 and 64 images x 576 tokens, CLIP-L features (Din=1024) -> 4096 -> 4096 (7B) and
-> 5120 -> 5120 (13B), bf16, frozen features (no dx), trained weights: the stage-1 and stage-2 case.
FLOPs: forward 2*N*(Din*Dh + Dh*Dout); backward 2x that without dx (dh, dW2, dW1).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import compiled, forward_and_full, measure, print_table, require_gpu  # noqa: E402


def setup(n_tokens, din, dh, dtype=torch.bfloat16, device="cuda"):
    """x (N, Din) frozen; w1 (Dh, Din), b1, w2 (Dh, Dh), b2 trained; dy (N, Dh) random."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(n_tokens, din, device=device, generator=g).to(dtype)
    w1 = (torch.randn(dh, din, device=device, generator=g) / din**0.5).to(dtype).requires_grad_()
    b1 = (torch.randn(dh, device=device, generator=g) * 0.1).to(dtype).requires_grad_()
    w2 = (torch.randn(dh, dh, device=device, generator=g) / dh**0.5).to(dtype).requires_grad_()
    b2 = (torch.randn(dh, device=device, generator=g) * 0.1).to(dtype).requires_grad_()
    dy = torch.randn(n_tokens, dh, device=device, generator=g).to(dtype)
    return x, [w1, b1, w2, b2], dy


def main():
    require_gpu("bench_projector")
    from fastllava.ops.fused_mlp_projector import fused_mlp_projector, fused_mlp_projector_reference

    eager_compiled = compiled(fused_mlp_projector_reference)
    for images in (16, 64):
        for dh in (4096, 5120):
            n, din = images * 576, 1024
            x, params, dy = setup(n, din, dh)
            flops_fwd = 2 * n * (din * dh + dh * dh)
            providers = {
                "eager": lambda: fused_mlp_projector_reference(x, *params),
                "torch.compile": lambda: eager_compiled(x, *params),
                "triton": lambda: fused_mlp_projector(x, *params, backend="triton"),
            }
            rows = []
            for name, fwd in providers.items():
                fwd_fn, full_fn = forward_and_full(fwd, lambda y: (y * dy).sum(), params)
                rows.append(measure(name, fwd_fn, full_fn, flops_fwd=flops_fwd, flops_full=3 * flops_fwd))
            print_table(f"projector N={images}x576 {din}->{dh}->{dh} bf16", rows)


if __name__ == "__main__":
    main()
