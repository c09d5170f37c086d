"""Fused linear cross-entropy vs eager PyTorch and torch.compile: speed, TFLOP/s, peak extra memory.

    python benchmarks/bench_flce.py

Shape: T=16384 tokens, V=32000 (LLaMA vocabulary), D=4096, bf16, hidden and LM head both trained.
FLOPs: logits 2*T*V*D forward; the two gradient GEMMs 4*T*V*D. The Triton path computes the gradients
inside its forward, so its "fwd" time holds the whole work and "bwd" only scales the stored grads.
Peak memory is the extra over inputs; eager keeps bf16 + fp32 (T, V) logits and their gradients.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import compiled, forward_and_full, measure, print_table, require_gpu  # noqa: E402


def setup(T=16384, V=32000, D=4096, dtype=torch.bfloat16, device="cuda", ignored=0.3):
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(T, D, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device=device, generator=g) / D**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), device=device, generator=g)
    labels[torch.rand(T, device=device, generator=g) < ignored] = -100  # prompts and image tokens
    return hidden, weight, labels


def main():
    require_gpu("bench_flce")
    from fastllava.ops.fused_linear_cross_entropy import (
        fused_linear_cross_entropy,
        fused_linear_cross_entropy_reference,
    )

    hidden, weight, labels = setup()
    T, D = hidden.shape
    V = weight.shape[0]
    eager_compiled = compiled(fused_linear_cross_entropy_reference)
    providers = {
        "eager": lambda: fused_linear_cross_entropy_reference(hidden, weight, labels),
        "torch.compile": lambda: eager_compiled(hidden, weight, labels),
        "triton": lambda: fused_linear_cross_entropy(hidden, weight, labels, backend="triton"),
    }
    rows = []
    for name, fwd in providers.items():
        fwd_fn, full_fn = forward_and_full(fwd, lambda loss: loss, [hidden, weight])
        rows.append(measure(name, fwd_fn, full_fn, flops_fwd=2 * T * V * D, flops_full=6 * T * V * D))
    print_table(f"fused linear cross-entropy T={T} V={V} D={D} bf16, reduction=sum", rows)


if __name__ == "__main__":
    main()
