"""Decode-step attention over a KV cache: one new query token per active sequence attends over that
sequence's cached keys and values (generation after the prompt's prefill).

A Triton kernel (GQA/MQA, online softmax in base 2 like varlen_attention's forward), a per-row torch
path (the CPU backend; batch-invariant by construction), and flash-attn's `flash_attn_with_kvcache` as
an optional baseline.

Shapes: B active sequences (one query token each), S cache slots, L cache capacity (positions per
slot), Hq query heads, Hkv key/value heads (Hq % Hkv == 0), D head dim.
Suffixes: q_BHD is (B, Hq, D), k_cache_SLKD is (S, L, Hkv, D), slots_B and lengths_B are (B,).

Not done (future work): split-K ("flash-decoding"). The grid is B * Hkv programs (times
cdiv(group, BLOCK_M) for groups over 64), so with B = 1 and 32 KV heads a 132-SM H200 runs 32 programs,
each streaming its whole cache row. Splitting the keys across programs and merging the partial
(output, log-sum-exp) pairs in a second kernel would fill the GPU for long caches at small batch; it
needs a heuristic on B * Hkv and L measured on a GPU, which this code has not seen yet.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from ..extras import require
from ._aot import TL_DTYPE_NAMES, KernelSpec
from ._backend import new_output, pick_backend
from ._library import attention_flops, custom_op, has_values, host_list
from .varlen_attention_kernels import LOG2E, _fwd_kv_step

BACKENDS = ("triton", "torch", "flash_attn")
TRITON_HEAD_DIMS = (64, 80, 96, 128)
_DTYPES = tuple(TL_DTYPE_NAMES)  # fp16, bf16, fp32
# On a GPU the kernel runs in fp16/bf16; fp32 exists for the interpreter tests, so fp32 CUDA inputs go to
# the torch path (as in varlen_attention).
_GPU_DTYPES = (torch.float16, torch.bfloat16)
# Query heads of one KV group are the M rows of the tiles: at least 16 (tl.dot's minimum), at most 64;
# larger groups (MQA with > 64 query heads) are split over cdiv(group, 64) programs that each re-read
# the group's cache row.
_MIN_BLOCK_M, _MAX_BLOCK_M = 16, 64


# ----------------------------------------------------------------------------------------------------
# Triton kernel.
# ----------------------------------------------------------------------------------------------------


# Slots, cache length and GQA group never specialized by the JIT (a group of 1 would become a constant, a
# length of 4096 "divisible by 16"): the compile check's specs compile exactly what runs (as
# varlen_attention_kernels._NOT_SPECIALIZED).
@triton.jit(do_not_specialize=["S", "L", "group"])
def _decode_kernel(
    Q,  # (B, Hq, D) queries of the new tokens; unit stride along D
    K, V,  # (S, L, Hkv, D) key and value caches; unit stride along D
    O,  # (B, Hq, D) output
    SLOTS,  # (B,) int32: cache slot of each query's sequence
    LENGTHS,  # (B,) int32: valid cached positions of that sequence, the new token's included
    sm_scale,  # softmax scale (fp32)
    stride_qb, stride_qh,  # q: elements between batch rows, between heads
    stride_ks, stride_kl, stride_kh,  # k cache: between slots, positions, heads
    stride_vs, stride_vl, stride_vh,  # v cache: between slots, positions, heads
    stride_ob, stride_oh,  # o: between batch rows, between heads
    S, L,  # slots and capacity of the cache, for the range guard
    group,  # Hq // Hkv query heads per key/value head
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_D = next_pow2(HEAD_DIM)
    BLOCK_M: tl.constexpr,  # query rows per program: next_pow2(group) clamped to 16 .. 64
    BLOCK_N: tl.constexpr,  # cached positions per loop step
    UPCAST: tl.constexpr,  # cast loads to fp32 (interpreter bf16 only)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, else "tf32" (unused for 16-bit operands)
):
    """One program: the outputs of query heads kv_h*group + pid_m*BLOCK_M .. +BLOCK_M (those < group) of
    sequence pid_b, i.e. the query heads sharing KV head kv_h = pid_h, over its cached positions."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_m = tl.program_id(2)
    slot = tl.load(SLOTS + pid_b)
    seqlen = tl.load(LENGTHS + pid_b)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # index inside the group
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (rows < group)[:, None] & (offs_d < HEAD_DIM)[None, :]
    heads = pid_h * group + rows
    O += pid_b.to(tl.int64) * stride_ob
    o_ptrs = O + heads[:, None] * stride_oh + offs_d[None, :]
    # Range guard instead of a host-side check (which would sync) or torch._assert_async (extra launches
    # on every layer of every decode step): a bad slot or length makes this row's output NaN, loudly,
    # and never reads outside the cache.
    if (slot < 0) | (slot >= S) | (seqlen < 1) | (seqlen > L):
        tl.store(o_ptrs, tl.full([BLOCK_M, BLOCK_D], float("nan"), tl.float32).to(O.dtype.element_ty), mask=row_ok)
        return

    Q += pid_b.to(tl.int64) * stride_qb
    K += slot.to(tl.int64) * stride_ks + pid_h * stride_kh
    V += slot.to(tl.int64) * stride_vs + pid_h * stride_vh
    q = tl.load(Q + heads[:, None] * stride_qh + offs_d[None, :], mask=row_ok, other=0.0)  # padded rows: 0
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = sm_scale * LOG2E  # exp2 instead of exp: one multiply folded into the scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end = (seqlen // BLOCK_N) * BLOCK_N  # blocks before this lie inside the sequence: no mask
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_kv_step(acc, l_i, m_i, q, K, V, stride_kl, stride_vl, start_n, rows, offs_d, seqlen,
                                     qk_scale, False, False, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, DOT_PRECISION)
    for start_n in range(full_end, seqlen, BLOCK_N):  # the ragged last block, if any
        # Masked: positions >= seqlen are neither read (whatever the cache holds there, NaN included, never
        # enters the arithmetic) nor weighted (score -inf).
        acc, l_i, m_i = _fwd_kv_step(acc, l_i, m_i, q, K, V, stride_kl, stride_vl, start_n, rows, offs_d, seqlen,
                                     qk_scale, True, False, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, DOT_PRECISION)
    acc = acc / l_i[:, None]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok)


# ----------------------------------------------------------------------------------------------------
# Launch configuration: the only place block sizes live; aot_specs() enumerates exactly these.
# ----------------------------------------------------------------------------------------------------


def _block_m(group: int) -> int:
    return min(max(triton.next_power_of_2(group), _MIN_BLOCK_M), _MAX_BLOCK_M)


def _kernel_config(head_dim: int, dtype: torch.dtype, group: int) -> dict:
    """Block sizes and launch options.

    GPU dtypes: BLOCK_N=64 with 3 stages pipelines the (64 x D) K and V tile loads of the next steps
    behind the current one (70 KiB of shared memory at D=128 16-bit, by the compile check), since the
    loop is bound by memory, not by its padded 16-row dots. Chosen without a GPU, not yet timed. Warps,
    from the compile check (Triton 3.9): with 4 warps, BLOCK_M=16 uses 112-128 registers (sm_90/sm_80,
    D=128) and no stack, but BLOCK_M=32 spills 8 B on sm_80 (D=80/96) and BLOCK_M=64 16 B (D=128);
    8 warps compile all three without spills.
    fp32 exists for tests only: small tiles keep the interpreter's IEEE dots cheap.
    The launcher calls this at every launch, so a test can monkeypatch it to run other tiles.
    """
    block_m = _block_m(group)
    if dtype == torch.float32:
        return dict(BLOCK_M=block_m, BLOCK_N=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4 if block_m == 16 else 8, num_stages=3)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The input's dtype, except fp32 for bf16 in the interpreter, whose fp32 -> bf16 cast truncates
    (see varlen_attention._out_dtype); torch rounds that buffer afterwards."""
    return torch.float32 if (x.dtype == torch.bfloat16 and not x.is_cuda) else x.dtype


def _launch(q_BHD, k_cache_SLKD, v_cache_SLKD, slots_B, lengths_B, sm_scale):
    """The Triton path. No host sync: nothing here reads a tensor's values."""
    B, Hq, D = q_BHD.shape
    S, L, Hkv, _ = k_cache_SLKD.shape
    if q_BHD.stride(-1) != 1:
        q_BHD = q_BHD.contiguous()  # B x Hq x D: a copy of the queries is cheap, unlike one of the cache
    o_BHD = new_output((B, Hq, D), _out_dtype(q_BHD), q_BHD.device)
    if B == 0:
        return o_BHD.to(q_BHD.dtype)
    group = Hq // Hkv
    cfg = _kernel_config(D, q_BHD.dtype, group)
    grid = (B, Hkv, triton.cdiv(group, cfg["BLOCK_M"]))
    _decode_kernel[grid](
        q_BHD, k_cache_SLKD, v_cache_SLKD, o_BHD, slots_B, lengths_B, sm_scale,
        q_BHD.stride(0), q_BHD.stride(1),
        k_cache_SLKD.stride(0), k_cache_SLKD.stride(1), k_cache_SLKD.stride(2),
        v_cache_SLKD.stride(0), v_cache_SLKD.stride(1), v_cache_SLKD.stride(2),
        o_BHD.stride(0), o_BHD.stride(1),
        S, L, group,
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
        # The 3.9 interpreter computes bf16 arithmetic wrongly; on CPU tensors (interpreter only) bf16
        # tiles are widened right after loading. GPUs keep bf16 for the tensor cores.
        UPCAST=(q_BHD.dtype == torch.bfloat16 and not q_BHD.is_cuda),
        DOT_PRECISION="ieee" if q_BHD.dtype == torch.float32 else "tf32",
        **cfg,
    )
    return o_BHD.to(q_BHD.dtype)


# ----------------------------------------------------------------------------------------------------
# Argument checks, the torch path, flash-attn, dispatch.
# ----------------------------------------------------------------------------------------------------


def _check_args(q, k_cache, v_cache, slots, lengths, scale, backend):
    """Metadata only (shapes, dtypes, devices, strides): runs on fake tensors; values are checked inside
    the op (_check_values)."""
    where = f"decode_attention(backend={backend!r})"
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"{where}: q must be a 3-D tensor (batch, heads, head_dim), got "
                         f"{getattr(q, 'shape', type(q))}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{where}: {name} must be a 4-D tensor (slots, capacity, kv_heads, head_dim), got "
                             f"{getattr(x, 'shape', type(x))}")
    allowed = _DTYPES if backend != "torch" else (*_DTYPES, torch.float64)  # the torch path runs float64 too
    if q.dtype not in allowed or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"{where}: q, k_cache, v_cache must share one dtype of {allowed}; got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{where}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have "
                         f"the same shape")
    B, Hq, D = q.shape
    Hkv, Dk = k_cache.shape[2:]
    if Dk != D:
        raise ValueError(f"{where}: cache head_dim {Dk} != q's head_dim {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{where}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    for name, x in (("slots", slots), ("lengths", lengths)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 or x.shape != (B,):
            raise ValueError(f"{where}: {name} must be an int32 tensor of shape (B={B},); got "
                             f"{getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}")
    devices = (q.device, k_cache.device, v_cache.device, slots.device, lengths.device)
    if len(set(devices)) != 1:
        raise ValueError(f"{where}: q, k_cache, v_cache, slots, lengths must be on one device; got "
                         f"{', '.join(str(d) for d in devices)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise ValueError(f"{where}: scale must be a Python number or None (1/sqrt(head_dim)), got {type(scale)}")
    if backend == "triton":
        if D not in TRITON_HEAD_DIMS:
            raise ValueError(f"{where}: head_dim {D} is not compiled for the Triton kernel; supported: "
                             f"{TRITON_HEAD_DIMS} (or use backend='torch')")
        if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
            raise ValueError(f"{where}: the caches need unit stride along head_dim (copying a cache per step "
                             f"would cost more than the attention); got strides {k_cache.stride()}, "
                             f"{v_cache.stride()}")


def _check_values(k_cache, slots, lengths, backend):
    """Host-side value checks: on CPU, and for the torch path, which reads these values anyway. The CUDA
    Triton and flash-attn paths read nothing on the host (see the kernel's range guard)."""
    if backend in ("flash_attn", "triton") and slots.is_cuda:
        return
    where = f"decode_attention(backend={backend!r})"
    S, L = k_cache.shape[0], k_cache.shape[1]
    if lengths.numel() and not ((lengths >= 1) & (lengths <= L)).all():
        bad = int(((lengths < 1) | (lengths > L)).nonzero()[0])
        raise ValueError(f"{where}: lengths must be in 1 .. L={L} (the new token included); row {bad} has "
                         f"{int(lengths[bad])}")
    if slots.numel() and not ((slots >= 0) & (slots < S)).all():
        bad = int(((slots < 0) | (slots >= S)).nonzero()[0])
        raise ValueError(f"{where}: slots must be in 0 .. S-1={S - 1}; row {bad} has {int(slots[bad])}")


def _torch_decode(q_BHD, k_cache_SLKD, v_cache_SLKD, slots_B, lengths_B, scale):
    """The `torch` backend: one row at a time, in fp32 (float64 for float64 inputs).

    Batch invariance by construction: each row runs the same ops on tensors of its own shapes (its own
    length), so its result cannot depend on which other rows are in the batch, bitwise. (One padded
    batched call would tie a row's reductions to max(lengths) and to batched GEMM kernel choices.) The
    cost is B small calls per layer, fine for CPU generation. Reads slots and lengths on the host: one
    sync per call on CUDA, where this path serves only fp32 inputs.
    """
    B, Hq, D = q_BHD.shape
    Hkv = k_cache_SLKD.shape[2]
    group = Hq // Hkv
    acc = torch.promote_types(q_BHD.dtype, torch.float32)
    o_BHD = torch.empty(q_BHD.shape, dtype=q_BHD.dtype, device=q_BHD.device)
    for b, (slot, n) in enumerate(zip(slots_B.tolist(), lengths_B.tolist())):
        # Query head h reads KV head h // group: heads kv*group .. kv*group + group - 1 share KV head kv.
        q_KGD = q_BHD[b].reshape(Hkv, group, D).to(acc)
        k_KND = k_cache_SLKD[slot, :n].transpose(0, 1).to(acc)
        v_KND = v_cache_SLKD[slot, :n].transpose(0, 1).to(acc)
        p_KGN = torch.softmax(torch.matmul(q_KGD, k_KND.transpose(1, 2)) * scale, dim=-1)
        o_BHD[b] = torch.matmul(p_KGN, v_KND).reshape(Hq, D).to(q_BHD.dtype)
    return o_BHD


def _flash_attn(q_BHD, k_cache_SLKD, v_cache_SLKD, slots_B, lengths_B, scale):
    """flash-attn's decode kernel. With one query row, causal=True aligns it with the last cached
    position (flash-attn aligns the causal mask bottom-right), so it sees all `lengths` positions."""
    flash_attn = require("flash_attn", "decode_attention(backend='flash_attn')")
    o_B1HD = flash_attn.flash_attn_with_kvcache(q_BHD[:, None], k_cache_SLKD, v_cache_SLKD, cache_seqlens=lengths_B,
                                                cache_batch_idx=slots_B, softmax_scale=scale, causal=True)
    return o_B1HD[:, 0]


def decode_attention(q_BHD, k_cache_SLKD, v_cache_SLKD, slots_B, lengths_B, *, scale=None, backend="auto"):
    """Attention of each sequence's new token over that sequence's KV cache (inference; no autograd).

    q_BHD: (B, Hq, D) queries of the new tokens (after RoPE); fp16, bf16 or fp32.
    k_cache_SLKD, v_cache_SLKD: (S, L, Hkv, D), q's dtype and device; S slots (one sequence each), L
    positions each, Hq % Hkv == 0 (GQA/MQA); unit stride along D for the Triton kernel.
    slots_B: (B,) int32, the slot of each row's sequence (0 <= slot < S; the op only reads, so a slot
    may appear twice).
    lengths_B: (B,) int32, valid cached positions of that sequence INCLUDING the new token, whose key
    and value are already written at position lengths - 1; 1 <= length <= L. Positions >= length are
    never read, whatever they hold.
    scale: softmax scale, default D ** -0.5.
    backend: "auto" (Triton on CUDA for fp16/bf16, torch elsewhere) or one of BACKENDS:
      "triton"      our kernel (CUDA fp16/bf16; CPU through Triton's interpreter, for tests);
      "torch"       one row at a time in fp32: exact, and batch-invariant (see _torch_decode);
      "flash_attn"  flash_attn_with_kvcache, if the flash-attn package is installed (CUDA only).
    Returns (B, Hq, D) in q's dtype: softmax(q k^T * scale) v over k_cache[slots[b], :lengths[b]], with
    fp32 accumulation.
    Slot and length values are checked by ValueError where they are read on the host (CPU, the torch
    backend); the CUDA Triton path never syncs: a row with an out-of-range slot or length comes out NaN.
    Runs as the custom op torch.ops.fastllava.decode_attention (fake implementation and FLOP formula; no
    autograd), every backend.
    """
    which = pick_backend(backend, q_BHD, BACKENDS, op="decode_attention")
    if which == "triton" and q_BHD.is_cuda and q_BHD.dtype == torch.float32:
        if backend != "auto":
            raise ValueError(f"decode_attention(backend='triton'): on CUDA the kernel takes fp16 or bf16, got "
                             f"{q_BHD.dtype}; use backend='torch' (or 'auto') for other dtypes")
        which = "torch"
    _check_args(q_BHD, k_cache_SLKD, v_cache_SLKD, slots_B, lengths_B, scale, which)
    if which == "flash_attn" and not q_BHD.is_cuda:
        raise ValueError(f"decode_attention: backend='flash_attn' runs on CUDA tensors only; got {q_BHD.device} "
                         f"(use backend='torch' or 'auto' on CPU)")
    sm_scale = float(scale) if scale is not None else q_BHD.shape[-1] ** -0.5
    with torch.no_grad():
        return torch.ops.fastllava.decode_attention(q_BHD, k_cache_SLKD, v_cache_SLKD, slots_B, lengths_B, sm_scale,
                                                    which)


@custom_op("decode_attention")
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                         lengths: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """(B, Hq, D). Inference only: no autograd is registered."""
    _check_values(k_cache, slots, lengths, backend)
    if backend == "torch":
        return _torch_decode(q, k_cache, v_cache, slots, lengths, scale)
    if backend == "triton":
        return _launch(q, k_cache, v_cache, slots, lengths, scale)
    if backend == "flash_attn":
        return _flash_attn(q, k_cache, v_cache, slots, lengths, scale)
    raise AssertionError(backend)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, slots, lengths, scale, backend):
    return q.new_empty(q.shape)


@register_flop_formula(torch.ops.fastllava.decode_attention, get_raw=True)
def _flops(q, k_cache, v_cache, slots, lengths, scale, backend, *, out_val=None):
    """4 sum(lengths) Hq D: q k^T and p v over each row's cached positions. Under fake tensors the lengths
    are unknown: every row is counted at the cache capacity L (an upper bound)."""
    B, Hq, D = q.shape
    total = sum(host_list(lengths)) if has_values(lengths) else B * k_cache.shape[1]
    return attention_flops(Hq, D, total, causal=False)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (python -m fastllava.ops.compile_check).
# ----------------------------------------------------------------------------------------------------

_CONSTEXPR_ARGS = {"HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "UPCAST", "DOT_PRECISION"}


def aot_specs() -> list[KernelSpec]:
    """Every kernel configuration the launcher can choose on a GPU (groups of 1..16, 17..32, > 32)."""
    specs = []
    for D in TRITON_HEAD_DIMS:
        for dtype in _GPU_DTYPES:
            t = TL_DTYPE_NAMES[dtype]
            for group in (1, 32, 64):  # one group per BLOCK_M the launcher can pick: 16, 32, 64
                cfg = _kernel_config(D, dtype, group)
                sig = {n: "constexpr" if n in _CONSTEXPR_ARGS else "i32" for n in _decode_kernel.arg_names}
                sig.update(Q=f"*{t}", K=f"*{t}", V=f"*{t}", O=f"*{t}", SLOTS="*i32", LENGTHS="*i32", sm_scale="fp32")
                const = dict(HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=cfg["BLOCK_M"],
                             BLOCK_N=cfg["BLOCK_N"], UPCAST=False, DOT_PRECISION="tf32")
                assert set(const) == {n for n, s in sig.items() if s == "constexpr"}, sig
                specs.append(KernelSpec(
                    name=f"decode_attn D={D} {t} BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']}",
                    fn=_decode_kernel, signature=sig, constexprs=const, num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"]))
    return specs
