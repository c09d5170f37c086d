"""What an op declares for the ahead-of-time compile check: every kernel configuration it can launch.

Each op module exposes `aot_specs() -> list[KernelSpec]`; the compile check (fastllava.ops.compile_check)
compiles every spec for sm_80 and sm_90 without a GPU and reports registers, spills and shared memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    name: str  # readable label, e.g. "varlen_attn_fwd D=128 bf16 BLOCK_M=128 BLOCK_N=64"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # argument name -> Triton type string ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
