"""One place that turns a backend name ("auto", "triton", "torch", ...) into the implementation to run.

`auto` picks the Triton kernel for CUDA tensors and the torch reference elsewhere (CPU runs,
tests). Explicit names are for tests and benchmarks; "triton" on CPU runs in Triton's interpreter
when TRITON_INTERPRET=1 was set before the op modules were imported.
"""

from __future__ import annotations

import os

import torch


def pick_backend(name: str, x: torch.Tensor, choices: tuple[str, ...], *, op: str) -> str:
    """Resolve `name` for an op whose inputs live where `x` lives."""
    if name == "auto":
        return "triton" if x.is_cuda and "triton" in choices else "torch"
    if name not in choices:
        raise ValueError(f"{op}: unknown backend {name!r}; choose one of {('auto',) + choices}")
    return name


def new_output(shape, dtype, device) -> torch.Tensor:
    """An uninitialized kernel output; NaN-filled under FASTLLAVA_POISON_OUTPUTS=1 so tests catch
    elements a kernel never writes."""
    if os.environ.get("FASTLLAVA_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
