"""One place that turns a backend name ("auto", "triton", "torch", ...) into the implementation to run.

`auto` picks the Triton kernel for CUDA tensors and the torch reference elsewhere (CPU runs, the demo,
tests). Explicit names are for tests and benchmarks; "triton" on CPU runs in Triton's interpreter
when TRITON_INTERPRET=1 was set before the op modules were imported.
"""

from __future__ import annotations

import torch


def pick_backend(name: str, x: torch.Tensor, choices: tuple[str, ...], *, op: str) -> str:
    """Resolve `name` for an op whose inputs live where `x` lives."""
    if name == "auto":
        return "triton" if x.is_cuda and "triton" in choices else "torch"
    if name not in choices:
        raise ValueError(f"{op}: unknown backend {name!r}; choose one of {('auto',) + choices}")
    return name
