"""Shared helpers for the kernel microbenchmarks: GPU check, timing, peak memory, device peaks, tables.

Timing: triton.testing.do_bench (CUDA events, L2 flushed between runs), median in ms, after warm-up,
on random data. Memory: peak bytes allocated by the measured call above what was allocated before it.
"Backward" is reported as full (forward + backward) minus forward, so ops whose gradients are
computed in the forward (fused linear cross-entropy) are timed the same way as the others.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

# Peak DRAM bandwidth in bytes/s, from the vendors' data sheets; matched against
# torch.cuda.get_device_name() in order, first hit wins.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5 (HBM3)
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB
]


def require_gpu(name: str) -> None:
    """Exit 0 with a message on machines without CUDA (CI, the CPU dev boxes)."""
    if not torch.cuda.is_available():
        print(f"{name}: no GPU (CUDA) available on this machine; nothing to measure.")
        sys.exit(0)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_bandwidth() -> float | None:
    name = device_name()
    for key, bw in PEAK_BANDWIDTH:
        if key in name:
            return bw
    return None


def time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() on the current CUDA device."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated while fn() runs, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def forward_and_full(forward: Callable[[], torch.Tensor], grad_of: Callable[[torch.Tensor], torch.Tensor],
                     params: list[torch.Tensor]):
    """(forward fn, full fn) for timing: full runs forward then backward of grad_of(output)."""

    def full():
        for p in params:
            p.grad = None
        out = forward()
        grad_of(out).backward()
        return out

    return forward, full


def measure(name: str, forward, full, flops_fwd: float | None = None, flops_full: float | None = None,
            bytes_fwd: float | None = None, bytes_full: float | None = None) -> dict:
    """One table row: times (ms), derived throughput, peak extra memory (GiB) of forward and full."""
    t_fwd, t_full = time_ms(forward), time_ms(full)
    row = {"provider": name, "fwd ms": t_fwd, "bwd ms": t_full - t_fwd, "full ms": t_full}
    if flops_fwd:
        row["fwd TFLOP/s"] = flops_fwd / t_fwd / 1e9
    if flops_full:
        row["full TFLOP/s"] = flops_full / t_full / 1e9
    bw = peak_bandwidth()
    if bytes_fwd:
        row["fwd GB/s"] = bytes_fwd / t_fwd / 1e6
        if bw:
            row["fwd % peak BW"] = 100 * bytes_fwd / (t_fwd * 1e-3) / bw
    if bytes_full:
        row["full GB/s"] = bytes_full / t_full / 1e6
    row["fwd peak GiB"] = peak_extra_bytes(forward) / 2**30
    row["full peak GiB"] = peak_extra_bytes(full) / 2**30
    return row


def print_table(title: str, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print(f"\n### {title}  ({device_name()}, torch {torch.__version__})\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def compiled(fn):
    """torch.compile of the eager reference, the same code (it graph-breaks where the reference syncs to the host)."""
    return torch.compile(fn, dynamic=False)
