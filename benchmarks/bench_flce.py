"""Fused linear cross-entropy microbenchmarks (pytest-benchmark): ours against eager PyTorch and torch.compile.

    python -m pytest benchmarks/bench_flce.py --benchmark-only

GPU: T=16384 tokens, V=32000 (LLaMA vocabulary), D=4096; T=8192 at Qwen2.5-7B's V=152064, D=3584 and
Llama-3.1-8B's V=128256, D=4096; bf16. CPU: T=256, V=1000, D=64, fp32, eager
only (triton and compile are timed on CUDA). Hidden states and LM head both trained, 30% of the labels
ignored (prompt and image tokens), reduction "sum".
Providers: triton (ours), eager (fused_linear_cross_entropy_reference), compile (torch.compile of it).
Modes: fwd, fwd+bwd. Our Triton path computes the gradients inside its forward when they are needed,
so its "fwd" time holds all the work and its backward only scales the stored gradients.
FLOPs (extra_info["flops"]): fastllava.flops.linear_cross_entropy_flops: the logits GEMM 2 T V D
forward; fwd+bwd adds the two gradient GEMMs, 6 T V D in all. On CUDA, extra_info["peak_extra_bytes"]
shows what the op is for: eager keeps the (T, V) logits in bf16 and fp32 and their gradient.
"""

from __future__ import annotations

import pytest
import torch

from fastllava.flops import linear_cross_entropy_flops
from fastllava.ops.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# T, V, D: LLaVA-1.5's LLaMA head; Qwen2.5-7B's (152064 rows, D=3584) and Llama-3.1-8B's (128256) at
# an 8192-token pack, where eager's fp32 logits alone are 5.0 and 4.2 GB.
SHAPES = ({"16k-32000-4096": (16384, 32000, 4096), "8k-152064-3584": (8192, 152064, 3584),
           "8k-128256-4096": (8192, 128256, 4096)} if CUDA else {"tiny": (256, 1000, 64)})
PROVIDERS = ("triton", "eager", "compile")
MODES = ("fwd", "fwd+bwd")


def setup(T, V, D, dtype=DTYPE, device=DEVICE, ignored=0.3):
    """hidden (T, D) and weight (V, D) trained, labels (T,) with a fraction `ignored` set to -100."""
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(T, D, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device=device, generator=g) / D**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), device=device, generator=g)
    labels[torch.rand(T, device=device, generator=g) < ignored] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_flce(measure, provider_fn, shape, provider, mode):
    op = provider_fn(provider, fused_linear_cross_entropy, fused_linear_cross_entropy_reference)
    T, V, D = SHAPES[shape]
    hidden, weight, labels = setup(T, V, D)

    def forward():
        return op(hidden, weight, labels)
    fn = forward if mode == "fwd" else (lambda: forward().backward())
    flops = linear_cross_entropy_flops(T, D, V, gemms=1 if mode == "fwd" else 3)
    measure(fn, group=f"flce {shape} {mode}", flops=flops, grads_of=(hidden, weight), tokens=T, vocab=V, dim=D,
            dtype=str(DTYPE).split(".")[-1])
