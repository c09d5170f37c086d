"""Ahead-of-time compile check for every Triton kernel in fastllava.ops, without a GPU.

    python -m fastllava.ops.compile_check [--arch 80 90] [--only SUBSTRING] [--jobs N] [--report FILE]

Imports each module of fastllava.ops, collects `aot_specs()` (a list of `_aot.KernelSpec`) where a module
defines it, compiles each spec to a cubin for every requested arch with `triton.compile`, and reads:
registers and stack bytes from Triton's bundled `cuobjdump -res-usage` (stack > 0 means the kernel
spills registers to local memory) and shared memory from the compiled metadata (`metadata.shared`).
Prints a markdown table and exits 1 on any compile error, spill, or shared memory above the device's
per-block opt-in maximum; exits 0 otherwise.

The interpreter (TRITON_INTERPRET=1) turns @triton.jit functions into Python callables that cannot be
compiled, so when the variable is set the check re-runs itself in a subprocess without it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from ._aot import default_divisible

# Per-block shared memory a kernel may opt into (bytes). NVIDIA Ampere tuning guide, 1.4.1.1: A100
# (sm_80) has 164 KB per SM and "a maximum of 163 KB per thread block"; NVIDIA Hopper tuning guide,
# 1.4.1.1: H100 (sm_90) has 228 KB per SM and "the maximum shared memory per thread block is 227 KB".
SMEM_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DEFAULT_ARCHS = (80, 90)
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass
class Result:
    module: str
    name: str
    arch: int
    num_warps: int
    num_stages: int
    regs: int = -1
    stack: int = -1  # bytes of per-thread stack; > 0 means spilled registers
    local: int = -1
    smem: int = -1  # bytes of shared memory (metadata.shared)
    seconds: float = 0.0
    error: str = ""

    def problems(self) -> list[str]:
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.stack > 0 or self.local > 0:
            out.append(f"spills ({self.stack} B stack, {self.local} B local per thread)")
        limit = SMEM_LIMIT_BYTES.get(self.arch)
        if limit is not None and self.smem > limit:
            out.append(f"shared memory {self.smem} B > sm_{self.arch} limit {limit} B")
        return out


def op_modules() -> list[str]:
    """Every module of fastllava.ops except private helpers and this tool."""
    pkg = importlib.import_module("fastllava.ops")
    return sorted(f"fastllava.ops.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
                  if not m.name.startswith("_") and m.name != "compile_check")


def collect(modules: list[str], only: str | None) -> list[tuple[str, int, str]]:
    """(module, index into its aot_specs(), spec name) for every spec to compile."""
    found = []
    for name in modules:
        mod = importlib.import_module(name)
        if not hasattr(mod, "aot_specs"):
            continue
        for i, spec in enumerate(mod.aot_specs()):
            if only is None or only in spec.name:
                found.append((name, i, spec.name))
    return found


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _divisible_args(spec) -> set[str]:
    """Arguments the JIT would specialize as multiples of 16 at a real launch: the spec's own list, or
    _aot.default_divisible (every pointer and every integer named stride*)."""
    if spec.divisible_by_16 is not None:
        return set(spec.divisible_by_16)
    return set(default_divisible(spec.signature))


def compile_one(module: str, index: int, arch: int) -> Result:
    """Compile spec `index` of `module` for sm_`arch`. Runs in a worker process (specs hold JIT functions,
    which do not pickle, so workers rebuild them from the module)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.import_module(module).aot_specs()[index]
    res = Result(module, spec.name, arch, spec.num_warps, spec.num_stages)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(spec.signature) if n in _divisible_args(spec)}
    src = ASTSource(fn=spec.fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        res.smem = int(kernel.metadata.shared)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            dump = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True)
        m = _RES_USAGE.search(dump.stdout)
        if m is None:
            raise RuntimeError(f"cannot parse cuobjdump output: {dump.stdout[:300]!r}")
        res.regs, res.stack, _, res.local = (int(g) for g in m.groups())
    except Exception as e:  # report every failing spec instead of stopping at the first
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    res.seconds = time.perf_counter() - t0
    return res


def table(results: list[Result]) -> str:
    lines = ["| kernel config | arch | warps | stages | regs | spill B | smem B | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        status = "; ".join(r.problems()) or "ok"
        lines.append(f"| {r.name} | sm_{r.arch} | {r.num_warps} | {r.num_stages} | {r.regs} | "
                     f"{max(r.stack, 0) + max(r.local, 0) if not r.error else '-'} | {r.smem} | {status} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastllava.ops.compile_check", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities, e.g. 80 90")
    p.add_argument("--only", default=None, help="compile only specs whose name contains this text")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    p.add_argument("--report", default=None, help="also write the table to this file")
    args = p.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "fastllava.ops.compile_check"] + (sys.argv[1:] if argv is None else argv)
        return subprocess.run(cmd, env=env).returncode

    t0 = time.perf_counter()
    specs = collect(op_modules(), args.only)
    jobs = [(mod, i, arch) for mod, i, _ in specs for arch in args.arch]
    if args.jobs > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(compile_one, *zip(*jobs)))
    else:
        results = [compile_one(*j) for j in jobs]
    results.sort(key=lambda r: (r.module, r.name, r.arch))
    text = table(results)
    bad = [r for r in results if r.problems()]
    summary = (f"\n{len(results)} compiles ({len(specs)} specs x {len(args.arch)} archs) from "
               f"{len({r.module for r in results})} modules in {time.perf_counter() - t0:.1f} s; "
               f"{len(bad)} with problems")
    print(text + summary)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n" + summary.strip() + "\n")
    for r in bad:
        print(f"FAIL {r.name} sm_{r.arch}: {'; '.join(r.problems())}", file=sys.stderr)
    if not results:
        print("no aot_specs() found in fastllava.ops", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
