"""What an op declares for the ahead-of-time compile check: every kernel configuration it can launch.

Each op module exposes `aot_specs() -> list[KernelSpec]`; the compile check (fastllava.ops.compile_check)
compiles every spec for sm_80 and sm_90 without a GPU and reports registers, spills and shared memory.
`TL_DTYPE_NAMES` is the one map from the torch dtypes the kernels take to Triton's type names, used to
write the specs' signatures ("*bf16") and by the ops' dtype checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# torch dtype -> Triton type name, for every dtype a Triton kernel of fastllava.ops accepts.
TL_DTYPE_NAMES: dict[torch.dtype, str] = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelSpec:
    name: str  # readable label, e.g. "varlen_attn_fwd D=128 bf16 BLOCK_M=128 BLOCK_N=64"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # argument name -> Triton type string ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    # Arguments the compile check marks 16-divisible, as the JIT does at a real launch for aligned
    # pointers and integers that are multiples of 16. None: default_divisible(signature).
    divisible_by_16: tuple[str, ...] | None = None


def default_divisible(signature: dict[str, str], *ints: str) -> tuple[str, ...]:
    """What the JIT marks "divisible by 16" at a launch with contiguous 16-bit tensors whose inner sizes are
    multiples of 8: every pointer (fresh torch allocations are 16-byte aligned) and every integer named
    stride*; plus `ints`, integer arguments whose values are multiples of 16 at the launch described.

    The marks decide whether loads vectorize, which moves register counts by 2x or more (measured on the
    attention kernels: D=128 forward spilled with unmarked strides, not with marked ones), so a spec per
    marking that real shapes produce: a vocabulary of 151,936 rows or a width of 3584 is marked (the JIT
    marks every integer argument that is a multiple of 16; Triton 3.9), 1031 or 729 tokens is not.
    """
    unknown = set(ints) - set(signature)
    assert not unknown, f"not kernel arguments: {sorted(unknown)}"
    return tuple(n for n, t in signature.items()
                 if t.startswith("*") or (n.startswith("stride") and t[0] in "iu") or n in ints)
