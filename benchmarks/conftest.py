"""What every kernel microbenchmark shares: one way to time a case and record its counts.

Timing. pytest-benchmark's timer is the host's wall clock and CUDA launches return before the GPU has
run them, so on CUDA the timed function ends with torch.cuda.synchronize() (the kernels' execution lies
inside the measured interval), and `benchmark.pedantic` runs a setup before every round, outside the
timing, that clears the gradients and synchronizes (nothing queued before the round is counted in it).
We keep pytest-benchmark's timer rather than CUDA events so that its statistics, --benchmark-json and
--benchmark-compare apply unchanged; the cost is one synchronize per round, a few microseconds on
cases of milliseconds. Pedantic with a setup runs one call per round: WARMUP untimed rounds first
(Triton's JIT and torch.compile compile there), then ROUNDS timed ones. Inputs are random, never
zeros, and at the GPU shapes far larger than L2, so rounds need no cache flush between them.

Recorded in `benchmark.extra_info` (and so in the JSON): the case's shape, the FLOPs of its matmuls or
the bytes it must move, the derived TFLOP/s or GB/s from the median time (with the fraction of the
device's datasheet peak from fastllava.hardware where the GPU is known), and on CUDA the peak memory
allocated during one call above what was allocated before it, measured after the timed rounds.
The session ends with the same figures as one markdown table (what benchmarks/gpu_suite.sh keeps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import pytest
import torch

from fastllava.hardware import detect

CUDA = torch.cuda.is_available()
# On CUDA: 2 warm-up rounds cover compilation (the first) and allocator growth (the second); 10 timed
# rounds, few enough for benchmarks/gpu_suite.sh's budgets (an estimate: no GPU run yet). On CPU the
# shapes are tiny.
WARMUP, ROUNDS = (2, 10) if CUDA else (1, 10)
_ROWS: list[tuple[str, str, float, dict]] = []  # (group, test id, median seconds, extra_info) for the summary


def pytest_configure(config):
    # Saved runs (--benchmark-autosave / --benchmark-save) and --benchmark-compare use
    # benchmarks/out/pytest-benchmark/ (git-ignored) instead of ./.benchmarks in whatever directory pytest
    # was started from, unless --benchmark-storage says otherwise. Runs before pytest-benchmark's own
    # pytest_configure (trylast), which opens the storage.
    if config.getoption("benchmark_storage", None) == "file://./.benchmarks":
        config.option.benchmark_storage = f"file://{Path(__file__).parent / 'out' / 'pytest-benchmark'}"


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _peak_extra_bytes(fn: Callable[[], object]) -> int:
    _sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    _sync()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


@pytest.fixture
def provider_fn():
    """provider_fn(provider, op, reference): the function a provider times. "triton": our op's kernel;
    "eager": the op's torch reference; "compile": torch.compile of that reference. The Triton and compiled
    providers skip without CUDA (the interpreter and CPU compilation are not worth timing)."""

    def pick(provider: str, op: Callable, reference: Callable) -> Callable:
        if provider in ("triton", "compile") and not CUDA:
            pytest.skip(f"{provider}: timed on CUDA only")
        if provider == "triton":
            return lambda *args: op(*args, backend="triton")
        return reference if provider == "eager" else torch.compile(reference, dynamic=False)

    return pick


@pytest.fixture
def measure(benchmark):
    """measure(fn, group=..., flops=..., bytes_moved=..., grads_of=..., **shape): time fn() and record.

    fn: no arguments; runs one case (the forward, or forward and backward). group: the table
    pytest-benchmark prints it in (one case and mode, every provider). flops: matmul FLOPs of the case
    (useful work only, the same for every provider); bytes_moved: bytes a memory-bound case must read and
    write. grads_of: leaf tensors whose .grad is cleared before every round (outside the timing), so
    each backward writes fresh gradients. Keyword arguments left over are recorded as they are.
    """

    def run(fn: Callable[[], object], *, group: str, flops: float | None = None,
            bytes_moved: float | None = None, grads_of: Iterable[torch.Tensor] = (), **shape) -> None:
        grads_of = list(grads_of)

        def setup():
            for t in grads_of:
                t.grad = None
            _sync()

        def timed():
            fn()
            _sync()

        benchmark.group = group
        info = benchmark.extra_info
        info.update(shape)
        info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
        benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: called once, nothing timed
            return
        seconds = benchmark.stats.stats.median
        gpu = detect() if CUDA else None
        if flops:
            info["flops"] = flops
            info["tflops"] = flops / seconds / 1e12
            if gpu is not None:
                info["pct_peak_bf16_tflops"] = 100 * info["tflops"] / gpu.bf16_tflops
        if bytes_moved:
            info["bytes"] = bytes_moved
            info["gbps"] = bytes_moved / seconds / 1e9
            if gpu is not None:
                info["pct_peak_bandwidth"] = 100 * bytes_moved / seconds / gpu.bandwidth
        if CUDA:
            setup()
            info["peak_extra_bytes"] = _peak_extra_bytes(fn)
        _ROWS.append((group, benchmark.name, seconds, dict(info)))

    return run


def pytest_terminal_summary(terminalreporter):
    """One markdown table of every case timed in this session: median, derived rate, peak memory."""
    if not _ROWS:
        return
    write = terminalreporter.write_line
    write("")
    write(f"Kernel benchmarks on {_ROWS[0][3]['device']}, torch {torch.__version__}: median of {ROUNDS} rounds")
    write("")
    write("| case | test | median ms | TFLOP/s | GB/s | % of peak | peak extra GiB |")
    write("|---|---|---|---|---|---|---|")
    for group, name, seconds, info in sorted(_ROWS, key=lambda r: (r[0], r[2])):
        pct = info.get("pct_peak_bf16_tflops", info.get("pct_peak_bandwidth"))
        cells = [f"{seconds * 1e3:.3f}", f"{info['tflops']:.3g}" if "tflops" in info else "",
                 f"{info['gbps']:.3g}" if "gbps" in info else "", f"{pct:.0f}" if pct is not None else "",
                 f"{info['peak_extra_bytes'] / 2**30:.2f}" if "peak_extra_bytes" in info else ""]
        write(f"| {group} | {name} | " + " | ".join(cells) + " |")
