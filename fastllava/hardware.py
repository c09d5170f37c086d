"""The GPUs fastllava plans for and measures on: one table of datasheet figures, and which one a device is.

Dense bf16 tensor-core peaks (no sparsity; GeForce cards: with fp32 accumulation, as training runs),
memory and DRAM bandwidth from the vendors' datasheets and the Ampere/Ada whitepapers (SXM parts unless
the name says PCIe). MFU divides by `bf16_tflops`; the planner sizes runs by `memory_gib`;
the memory-bound kernel benchmarks report a fraction of `bandwidth`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPU:
    """One GPU's datasheet figures."""

    name: str  # the name the planner's --gpu flag takes
    device_names: tuple[str, ...]  # names found as whole words in torch.cuda.get_device_name()
    bf16_tflops: float  # dense bf16 peak, TFLOP/s
    memory_gib: float
    bandwidth: float  # peak DRAM bandwidth, bytes/s


# Most specific names first: a device takes the first entry whose name it contains as a whole word
# ("A10" is not found in "A100" or "A10G", "L4" not in "L40S").
GPUS: tuple[GPU, ...] = (
    GPU("H200", ("H200",), 989.0, 141.0, 4.8e12),
    GPU("H100-PCIe", ("H100 PCIe",), 756.0, 80.0, 2.0e12),
    GPU("H100-80G", ("H100",), 989.0, 80.0, 3.35e12),
    GPU("A100-80G-PCIe", ("A100 80GB PCIe",), 312.0, 80.0, 1.935e12),
    GPU("A100-80G", ("A100-SXM4-80GB",), 312.0, 80.0, 2.039e12),
    GPU("A100-40G", ("A100",), 312.0, 40.0, 1.555e12),
    GPU("L40S", ("L40S",), 362.0, 48.0, 0.864e12),
    # 24 GB cards: LoRA and small-pack territory (python -m fastllava.plan --memory names what fits).
    GPU("A10", ("A10",), 125.0, 24.0, 0.600e12),
    GPU("L4", ("L4",), 121.0, 24.0, 0.300e12),
    GPU("RTX-4090", ("RTX 4090",), 165.2, 24.0, 1.008e12),
    GPU("RTX-3090", ("RTX 3090",), 71.0, 24.0, 0.936e12),
)
BY_NAME = {g.name: g for g in GPUS}


def gpu(name: str) -> GPU:
    """The table entry called `name` (e.g. "A100-80G"); ValueError naming the choices otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(BY_NAME)}") from None


def detect(device: torch.device | str | None = None) -> GPU | None:
    """The table entry of a CUDA device, or None for the CPU and GPUs the table does not know."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return match(torch.cuda.get_device_name(device))


def match(device_name: str) -> GPU | None:
    """The table entry whose name `device_name` (as torch.cuda.get_device_name gives it) contains as a
    whole word, or None."""
    for g in GPUS:
        if any(re.search(rf"(?<![\w-]){re.escape(s)}(?![\w]| Ti\b)", device_name) for s in g.device_names):
            return g
    return None


def peak_tflops(device: torch.device | str, override: float | None = None) -> float | None:
    """Dense bf16 TFLOP/s of one `device` for MFU: `override` if given, None where MFU means nothing."""
    if override is not None:
        return override
    found = detect(device)
    return None if found is None else found.bf16_tflops
