"""How fastllava's ops meet torch.library: the `fastllava::` namespace, a registry of the real
implementations, and the helpers the ops' fake implementations and FLOP formulas share.

Each public op function (varlen_attention, fused_mlp_projector, ...) checks its arguments' metadata,
resolves `backend`, and calls ONE custom op `torch.ops.fastllava.<name>` whose arguments are tensors and
plain str/int/float/bool values. The op has a fake implementation (shapes only: FakeTensorMode,
torch.compile and the meta-device planner run through it), its autograd registered with
`register_autograd` (the backward is a second custom op where it launches kernels) and, for
matmul-class work, a FLOP formula for torch.utils.flop_counter.FlopCounterMode. docs/kernels.md has
the rules (no host reads inside a training micro-step) and what each op registers.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch._subclasses.functional_tensor import FunctionalTensor

NAMESPACE = "fastllava"

# "fastllava::name" -> the Python function behind the op. A dispatch mode sees a custom op as one call;
# tests that must look inside it (tests/model/test_no_host_sync.py) run this function under the mode.
IMPLS: dict[str, Callable] = {}


def custom_op(name: str) -> Callable:
    """torch.library.custom_op("fastllava::<name>") that also records the implementation in IMPLS."""

    def register(fn: Callable):
        qualname = f"{NAMESPACE}::{name}"
        IMPLS[qualname] = fn
        return torch.library.custom_op(qualname, mutates_args=())(fn)

    return register


def no_tensor(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (0,) placeholder an op returns for an output that was not asked for (custom ops cannot return
    None)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


def or_none(x: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    """An op output turned back into a gradient: None where it was not asked for."""
    return x if wanted else None


def has_values(x: torch.Tensor) -> bool:
    """Whether x's values can be read: not a fake or meta tensor (FLOP formulas under FakeTensorMode)."""
    return not isinstance(x, (FakeTensor, FunctionalTensor)) and x.device.type != "meta"


def sum_sq_lengths(cu_seqlens: torch.Tensor, tokens: int, max_seqlen: int) -> int:
    """sum_i l_i^2 over the samples of cu_seqlens, for attention FLOP formulas.

    Reads cu_seqlens on the host: FlopCounterMode is a measuring tool, not a training step. Under fake
    tensors the lengths are unknown and the bound tokens * max_seqlen is returned instead (exact when
    every sample has the longest length; torch's own varlen formulas assume a worst case too). A
    PackedBatch built outside the fake mode keeps real tensors, so a fake model on a real batch still
    counts exactly.
    """
    if not has_values(cu_seqlens):
        return tokens * max_seqlen
    bounds = host_list(cu_seqlens)
    return sum((b - a) ** 2 for a, b in zip(bounds[:-1], bounds[1:]))


def host_list(x: torch.Tensor) -> list:
    """x.tolist() of a real tensor, also while a FakeTensorMode is active (which refuses it)."""
    with unset_fake_temporarily():
        return x.tolist()


# ----------------------------------------------------------------------------------------------------
# FLOP counts: the one convention. The ops' registered formulas, fastllava/flops.py (MFU, the planner)
# and the benchmarks' TFLOP/s all call these, so one number means one thing everywhere.
#
# Useful FLOPs: 2 per multiply-add of the math the op computes. A backward counts the GEMMs autograd of
# the plain math runs: attention's backward is twice its forward (dP = dO V^T, dV = P^T dO, dQ = dS K,
# dK = dS^T Q: 4 matmuls against the forward's 2), which is what FlopCounterMode gives for autograd
# through plain matmuls and what MFU divides (PaLM appendix B, nanoGPT). FlashAttention-style kernels
# (ours, FA2) also recompute S = Q K^T in the backward, 5 matmuls, 2.5x: FA2's
# benchmarks/benchmark_flash_attention.py counts that executed work ("bwd" 2.5 f, "fwd_bwd" 3.5 f), and
# torch's sdpa_backward_flop_count does too. It is recomputation, like activation checkpointing, so it is
# not counted here: a TFLOP/s of ours is 3/3.5 = 0.86x the FA2 convention's for a forward + backward.
# Causal attention counts half of the l^2 query-key pairs (l^2 / 2, FA2's convention too).
# ----------------------------------------------------------------------------------------------------

ATTENTION_BACKWARD_FACTOR = 2


def attention_flops(heads: int, head_dim: int, pairs: int, *, causal: bool, backward: bool = False) -> int:
    """FLOPs of attention over `pairs` = sum_i q_len_i * k_len_i query-key pairs (sum_i l_i^2 for
    self-attention on samples of lengths l_i; sum of cache lengths for one decode step), `heads` query
    heads of `head_dim`: Q K^T and P V, 2 x 2 x head_dim per pair and head, halved when causal; the
    backward ATTENTION_BACKWARD_FACTOR times that."""
    forward = 4 * heads * head_dim * pairs // (2 if causal else 1)
    return ATTENTION_BACKWARD_FACTOR * forward if backward else forward


def mlp_projector_flops(tokens: int, din: int, dh: int, dout: int, *, backward: tuple = ()) -> int:
    """Linear(din, dh) -> GELU -> Linear(dh, dout) on `tokens` rows: the forward's two GEMMs, or with
    `backward` the GEMMs named in it: "da" (dy w2, the hidden's gradient), "dw2", "dw1", "dx"."""
    if not backward:
        return 2 * tokens * (din * dh + dh * dout)
    sizes = {"da": dh * dout, "dw2": dh * dout, "dw1": din * dh, "dx": din * dh}
    unknown = set(backward) - set(sizes)
    assert not unknown, f"unknown projector GEMMs {unknown}"
    return 2 * tokens * sum(sizes[g] for g in backward)


def linear_cross_entropy_flops(tokens: int, dim: int, vocab: int, gemms: int = 1) -> int:
    """The LM head's (tokens, dim) x (dim, vocab) GEMM `gemms` times: 1 for the logits, +1 for the hidden
    states' gradient, +1 for the weight's."""
    return 2 * tokens * dim * vocab * gemms
