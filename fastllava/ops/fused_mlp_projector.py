"""The LLaVA-1.5 projector (mlp2x_gelu): Linear -> exact GELU -> Linear, weights in nn.Linear layout.

Shapes: N visual tokens, Din vision width, Dh = Dout LLM width. Legend for suffixes: x_ND (N, Din),
h_NH / a_NH (N, Dh) pre-activation / activation, y_NO (N, Dout).

Triton path (backend="triton"):
  forward   h_NH = x @ w1.T + b1 and a_NH = gelu(h_NH) come out of ONE Triton GEMM whose epilogue adds
            the bias and applies erf-GELU in fp32 before the single rounding to the input dtype;
            y = addmm(b2, a, w2.T) runs on cuBLAS (plain GEMM, bias already fused there).
  saved     the pre-activation h_NH only (a_NH is recomputed from it in the backward epilogue).
  backward  dh_NH = (dy @ w2) * gelu'(h_NH) comes out of ONE Triton GEMM whose epilogue also writes
            a_NH = gelu(h_NH) for dW2 and per-tile column sums of dh in fp32 for db1 (reduced over
            tiles by torch, in a fixed order: deterministic, no atomics). The weight-gradient GEMMs
            (dW2 = dy.T @ a, dW1 = dh.T @ x) and dx = dh @ w1 are plain cuBLAS GEMMs.
See docs/kernels.md for why these choices and what remains to be measured on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from ._aot import TL_DTYPE_NAMES, KernelSpec
from ._backend import new_output, pick_backend
from ._library import custom_op, mlp_projector_flops, no_tensor, or_none

BACKENDS = ("torch", "triton")


def fused_mlp_projector_reference(x, w1, b1, w2, b2):
    """x (N, Din), w1 (Dh, Din), b1 (Dh,), w2 (Dout, Dh), b2 (Dout,) -> (N, Dout)."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


# ----------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _matmul_tile(
    a_ptr,  # A (M, K), any strides, already moved to this tile's first row
    b_ptr,  # B (K, N), any strides, already moved to this tile's first column
    rows_left,  # rows of A from this tile's first row to the end (may exceed BLOCK_M)
    cols_left,  # columns of B from this tile's first column to the end
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask in the main loop
    INPUT_PRECISION: tl.constexpr,
):
    """fp32 accumulator of one (BLOCK_M, BLOCK_N) tile of A @ B.

    Tile-local int32 offsets and rows/columns past the edge clamped to the last valid one (their results
    are never stored), so the main loop carries no M/N masks: full masks and 64-bit offset tensors
    made the 128x128x64 tile spill (REG 255, STACK 160-1088 on sm_90, measured with the AOT check).
    """
    offs_m = tl.minimum(tl.arange(0, BLOCK_M), rows_left - 1)
    offs_n = tl.minimum(tl.arange(0, BLOCK_N), cols_left - 1)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped launch order: GROUP_M row tiles share each column tile while it sits in L2."""
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _gelu_fwd(h):
    return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))  # 1/sqrt(2)


@triton.jit
def _linear_bias_gelu_fwd_kernel(
    # One program computes one (BLOCK_M, BLOCK_N) tile of h = x @ w.T + b and a = gelu(h).
    x_ptr,  # x (M, K): vision features
    w_ptr,  # w (N, K): first projector weight, nn.Linear layout
    b_ptr,  # b (N,): first projector bias
    h_ptr,  # out h (M, N): pre-activation, contiguous; written only when STORE_PRE
    a_ptr,  # out a (M, N): gelu(h), contiguous
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    STORE_PRE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    acc = _matmul_tile(
        x_ptr + row0.to(tl.int64) * stride_xm, w_ptr + col0.to(tl.int64) * stride_wn, M - row0, N - col0, K,
        stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INPUT_PRECISION,
    )
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    bias = tl.load(b_ptr + col0 + offs_n, mask=offs_n < N - col0, other=0.0).to(tl.float32)
    h = acc + bias[None, :]
    mask = (offs_m[:, None] < M - row0) & (offs_n[None, :] < N - col0)
    tile0 = row0.to(tl.int64) * N + col0  # outputs are contiguous (M, N)
    out_offs = offs_m[:, None] * N + offs_n[None, :]
    if STORE_PRE:
        tl.store(h_ptr + tile0 + out_offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(a_ptr + tile0 + out_offs, _gelu_fwd(h).to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_grad_matmul_kernel(
    # One program computes one (BLOCK_M, BLOCK_N) tile of dh = (dy @ w2) * gelu'(h), the matching
    # tile of a = gelu(h) (when STORE_ACT) and the column sums of its dh tile (for db1).
    dy_ptr,  # dy (M, K): gradient of the projector output, K = Dout
    w_ptr,  # w2 (K, N): second projector weight, nn.Linear layout (Dout, Dh)
    h_ptr,  # h (M, N): saved pre-activation, contiguous
    dh_ptr,  # out dh (M, N): contiguous
    a_ptr,  # out a (M, N): gelu(h), contiguous; written only when STORE_ACT
    dbias_ptr,  # out (cdiv(M, BLOCK_M), N) fp32: per-row-tile column sums of dh
    M,
    N,
    K,
    stride_dym,
    stride_dyk,
    stride_wk,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    STORE_ACT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    da = _matmul_tile(
        dy_ptr + row0.to(tl.int64) * stride_dym, w_ptr + col0.to(tl.int64) * stride_wn, M - row0, N - col0, K,
        stride_dym, stride_dyk, stride_wk, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INPUT_PRECISION,
    )
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M - row0) & (offs_n[None, :] < N - col0)
    tile0 = row0.to(tl.int64) * N + col0  # h, dh and a are contiguous (M, N)
    tile_offs = offs_m[:, None] * N + offs_n[None, :]
    h = tl.load(h_ptr + tile0 + tile_offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))  # 1/sqrt(2)
    pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # 1/sqrt(2 pi)
    # rows past M hold a clamped copy of the last row's da: zero them so the column sums stay exact
    dh = tl.where(mask, da * (cdf + h * pdf), 0.0)
    tl.store(dh_ptr + tile0 + tile_offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)
    if STORE_ACT:
        tl.store(a_ptr + tile0 + tile_offs, (h * cdf).to(a_ptr.dtype.element_ty), mask=mask)
    tl.store(dbias_ptr + pid_m.to(tl.int64) * N + col0 + offs_n, tl.sum(dh, axis=0), mask=offs_n < N - col0)


# ----------------------------------------------------------------------------------------------------
# Launch configurations: every one of them is listed by aot_specs().

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), per dtype. 16-bit: tensor-core tiles that
# compile without spills for sm_80 and sm_90 (AOT check: forward 128x128x64 at 193-220 registers; the
# backward at 128x128 spilled 784-1008 B/thread from its heavier epilogue, 128x64 fits in 180-220).
# Throughput tuning is still to be done on a GPU (docs/kernels.md). fp32 is a test/debug dtype
# (exact "ieee" products unless torch allows TF32): a small tile.
_FWD_CONFIGS = {
    torch.float16: (128, 128, 64, 8, 8, 3),
    torch.bfloat16: (128, 128, 64, 8, 8, 3),
    torch.float32: (64, 64, 32, 8, 4, 2),
}
_BWD_CONFIGS = {
    torch.float16: (128, 64, 64, 8, 8, 3),
    torch.bfloat16: (128, 64, 64, 8, 8, 3),
    torch.float32: (64, 64, 32, 8, 4, 2),
}


def _input_precision(dtype):
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # match torch's own fp32 matmul, which is exact fp32 unless TF32 is allowed
    return "tf32"  # ignored for 16-bit inputs


def _launch_fwd(x_ND, w1, b1, store_pre):
    M, K = x_ND.shape
    N = w1.shape[0]
    bm, bn, bk, gm, warps, stages = _FWD_CONFIGS[x_ND.dtype]
    a_NH = new_output((M, N), x_ND.dtype, x_ND.device)
    h_NH = new_output((M, N), x_ND.dtype, x_ND.device) if store_pre else a_NH
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _linear_bias_gelu_fwd_kernel[grid](
        x_ND, w1, b1, h_NH, a_NH, M, N, K,
        x_ND.stride(0), x_ND.stride(1), w1.stride(0), w1.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, EVEN_K=K % bk == 0, STORE_PRE=store_pre,
        INPUT_PRECISION=_input_precision(x_ND.dtype), num_warps=warps, num_stages=stages,
    )
    return (h_NH if store_pre else None), a_NH


def _launch_bwd(dy_NO, w2, h_NH, store_act):
    M, K = dy_NO.shape
    N = w2.shape[1]
    bm, bn, bk, gm, warps, stages = _BWD_CONFIGS[h_NH.dtype]
    dh_NH = new_output((M, N), h_NH.dtype, h_NH.device)
    a_NH = new_output((M, N), h_NH.dtype, h_NH.device) if store_act else dh_NH
    dbias_partial = new_output((triton.cdiv(M, bm), N), torch.float32, h_NH.device)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _gelu_grad_matmul_kernel[grid](
        dy_NO, w2, h_NH, dh_NH, a_NH, dbias_partial, M, N, K,
        dy_NO.stride(0), dy_NO.stride(1), w2.stride(0), w2.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, EVEN_K=K % bk == 0, STORE_ACT=store_act,
        INPUT_PRECISION=_input_precision(h_NH.dtype), num_warps=warps, num_stages=stages,
    )
    return dh_NH, (a_NH if store_act else None), dbias_partial.sum(0)


# ----------------------------------------------------------------------------------------------------
# The custom ops: fastllava::fused_mlp_projector and its backward (fake implementations, autograd, FLOPs).


def _torch_forward(x_ND, w1, b1, w2, b2):
    h_NH = F.linear(x_ND, w1, b1)
    return F.linear(F.gelu(h_NH), w2, b2), h_NH


def _torch_backward(dy_NO, x_ND, w1, w2, h_NH, need_x, need_w1, need_b1, need_w2, need_b2):
    """What autograd computes for F.linear -> F.gelu -> F.linear (the same aten ops), from h alone."""
    dx = dw1 = db1 = dw2 = db2 = None
    if need_w2:
        dw2 = dy_NO.t().mm(F.gelu(h_NH))
    if need_b2:
        db2 = dy_NO.sum(0)
    if need_x or need_w1 or need_b1:
        dh_NH = torch.ops.aten.gelu_backward(dy_NO.mm(w2), h_NH)
        if need_w1:
            dw1 = dh_NH.t().mm(x_ND)
        if need_b1:
            db1 = dh_NH.sum(0)
        if need_x:
            dx = dh_NH.mm(w1)
    return dx, dw1, db1, dw2, db2


def _triton_forward(x_ND, w1, b1, w2, b2, save_pre):
    h_NH, a_NH = _launch_fwd(x_ND.contiguous(), w1.contiguous(), b1.contiguous(), store_pre=save_pre)
    return torch.addmm(b2, a_NH, w2.t()), h_NH


def _triton_backward(dy_NO, x_ND, w1, w2, h_NH, need_x, need_w1, need_b1, need_w2, need_b2):
    dy_NO = dy_NO.contiguous()
    dx = dw1 = db1 = dw2 = db2 = None
    if need_x or need_w1 or need_b1 or need_w2:
        dh_NH, a_NH, db1_f32 = _launch_bwd(dy_NO, w2.contiguous(), h_NH, store_act=need_w2)
        if need_w2:
            dw2 = dy_NO.t().mm(a_NH)
        del a_NH
        if need_w1:
            dw1 = dh_NH.t().mm(x_ND)
        if need_b1:
            db1 = db1_f32.to(h_NH.dtype)
        if need_x:
            dx = dh_NH.mm(w1)
    if need_b2:
        db2 = dy_NO.sum(0, dtype=torch.float32).to(dy_NO.dtype)
    return dx, dw1, db1, dw2, db2


@custom_op("fused_mlp_projector")
def _projector_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                  save_pre: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (N, Dout), h (N, Dh) the pre-activation the backward reads; (0,) unless save_pre)."""
    if backend == "triton":
        y_NO, h_NH = _triton_forward(x, w1, b1, w2, b2, save_pre)
    else:
        y_NO, h_NH = _torch_forward(x, w1, b1, w2, b2)
    return y_NO, (h_NH if save_pre else no_tensor(x))


@_projector_op.register_fake
def _(x, w1, b1, w2, b2, save_pre, backend):
    h = x.new_empty((x.shape[0], w1.shape[0])) if save_pre else no_tensor(x)
    return x.new_empty((x.shape[0], w2.shape[0])), h


@custom_op("fused_mlp_projector_backward")
def _projector_backward_op(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, h: torch.Tensor,
                           needs: list[bool], backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor]:
    """(dx, dw1, db1, dw2, db2), each (0,) where `needs` (x, w1, b1, w2, b2) says it is not wanted."""
    fn = _triton_backward if backend == "triton" else _torch_backward
    grads = fn(dy, x, w1, w2, h, *needs)
    return tuple(g if g is not None else no_tensor(dy) for g in grads)


@_projector_backward_op.register_fake
def _(dy, x, w1, w2, h, needs, backend):
    shapes = (x.shape, w1.shape, (w1.shape[0],), w2.shape, (w2.shape[0],))
    return tuple(dy.new_empty(s) if need else no_tensor(dy) for s, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, w1, _, w2, _, _, backend = inputs
    ctx.save_for_backward(x, w1, w2, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dh):
    x, w1, w2, h = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = torch.ops.fastllava.fused_mlp_projector_backward(dy, x, w1, w2, h, needs, ctx.backend)
    return (*(or_none(g, need) for g, need in zip(grads, needs)), None, None)


_projector_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.fastllava.fused_mlp_projector)
def _forward_flops(x_shape, w1_shape, b1_shape, w2_shape, b2_shape, *args, out_shape=None, **kwargs):
    (n, din), (dh, dout) = x_shape, (w1_shape[0], w2_shape[0])
    return mlp_projector_flops(n, din, dh, dout)


@register_flop_formula(torch.ops.fastllava.fused_mlp_projector_backward)
def _backward_flops(dy_shape, x_shape, w1_shape, w2_shape, h_shape, needs, backend, *, out_shape=None):
    """The GEMMs the backward runs: da = dy w2 (whenever dh is needed; the Triton kernel runs it for dW2
    too), dW2, dW1, dx."""
    (n, din), dh, dout = x_shape, w1_shape[0], w2_shape[0]
    need_x, need_w1, need_b1, need_w2, _ = needs
    da = need_x or need_w1 or need_b1 or (need_w2 and backend == "triton")
    gemms = [g for g, run in (("da", da), ("dw2", need_w2), ("dw1", need_w1), ("dx", need_x)) if run]
    return mlp_projector_flops(n, din, dh, dout, backward=tuple(gemms))


# ----------------------------------------------------------------------------------------------------
# Argument checks, dispatch


def _check_inputs(x, w1, b1, w2, b2, backend):
    """Shapes (both backends: the fake implementation trusts them) and, for Triton, dtypes."""
    din = x.shape[-1]
    if w1.dim() != 2 or w1.shape[1] != din:
        raise ValueError(f"fused_mlp_projector: w1 must be (Dh, Din={din}) in nn.Linear layout, got {tuple(w1.shape)}")
    if b1.shape != (w1.shape[0],):
        raise ValueError(f"fused_mlp_projector: b1 must be ({w1.shape[0]},), got {tuple(b1.shape)}")
    if w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"fused_mlp_projector: w2 must be (Dout, Dh={w1.shape[0]}), got {tuple(w2.shape)}")
    if b2.shape != (w2.shape[0],):
        raise ValueError(f"fused_mlp_projector: b2 must be ({w2.shape[0]},), got {tuple(b2.shape)}")
    dtypes = {t.dtype for t in (x, w1, b1, w2, b2)}
    if backend == "triton" and (len(dtypes) != 1 or x.dtype not in _FWD_CONFIGS):
        raise ValueError(
            "fused_mlp_projector (triton): x, w1, b1, w2, b2 must share one dtype among fp16/bf16/fp32, got "
            f"{[str(t.dtype) for t in (x, w1, b1, w2, b2)]}; cast the features to the projector's dtype"
        )


def fused_mlp_projector(x, w1, b1, w2, b2, *, backend="auto"):
    """Linear(w1, b1) -> GELU (exact, erf) -> Linear(w2, b2).

    x: (N, Din) or (..., Din) features; w1: (Dh, Din), b1: (Dh,), w2: (Dout, Dh), b2: (Dout,),
    nn.Linear layout, all one dtype (fp16/bf16/fp32) for backend="triton".
    Returns (N, Dout) (or (..., Dout)) in x's dtype. Differentiable in every input; x may be frozen.
    backend="auto": Triton on CUDA when Din, Dh and Dout are multiples of 16 (every released model's
    are), torch otherwise.
    Runs as the custom op torch.ops.fastllava.fused_mlp_projector (fake implementation, registered
    backward, FLOP formula: see docs/kernels.md), both backends.
    """
    which = pick_backend(backend, x, BACKENDS, op="fused_mlp_projector")
    if which == "triton" and backend == "auto" and not _compiled_widths(w1.shape[1], w1.shape[0], w2.shape[0]):
        which = "torch"  # widths that are not multiples of 16: the kernel spills there (see _EQUALS)
    _check_inputs(x, w1, b1, w2, b2, which)
    lead = x.shape[:-1]
    # The pre-activation is kept for the backward only when one will run.
    save_pre = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2, b2))
    y, _ = torch.ops.fastllava.fused_mlp_projector(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2, save_pre, which)
    return y.reshape(*lead, w2.shape[0])


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile check


# The integers a launch marks as multiples of 16 (see _aot.default_divisible), by what they equal: the
# token count M, the output width N, the reduction width K (row strides equal K or N: inputs are made
# contiguous). Every released width is a multiple of 16 (768, 896, 1024, 1152, 3584, 4096, 5120), and
# EVEN_K (K % BLOCK_K == 0) implies K is one; the token count is one for CLIP (576 per image) and not for
# SigLIP-SO400M (729 per image) unless 16 images share a launch. Widths that are not multiples of 16 mark
# nothing, and that specialization spills (16-bit forward 104 B/thread on sm_80, 56 on sm_90; backward
# 16 B; compile check of 2026-12-06): backend="auto" gives them to torch (_compiled_widths), so only an
# explicit backend="triton" (the tests' odd sizes) runs it, and it is not among the specs.
_EQUALS = {"fwd": {"M": ("M",), "N": ("N",), "K": ("K", "stride_xm", "stride_wn")},
           "bwd": {"M": ("M",), "N": ("N", "stride_wk"), "K": ("K", "stride_dym")}}
_MARKINGS = {True: ("NK", "MNK"), False: ("NK",)}  # by EVEN_K


def _compiled_widths(din, dh, dout):
    """Whether the widths give a launch that aot_specs() compiles (multiples of 16, see _EQUALS)."""
    return din % 16 == 0 and dh % 16 == 0 and dout % 16 == 0


def _markings(kind, sig, even_k):
    """(name suffix, divisible_by_16) for every marking a launch with this EVEN_K produces."""
    pointers = tuple(n for n, t in sig.items() if t.startswith("*"))
    return [(f" {m}%16=0" if m else "", pointers + tuple(a for c in m for a in _EQUALS[kind][c]))
            for m in _MARKINGS[even_k]]


def aot_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, config, flags, integers marked divisible by 16) the launchers above can produce."""
    specs = []
    ints = {n: "i32" for n in ("M", "N", "K")}
    flags = [(store, even_k) for store in (True, False) for even_k in (True, False)]
    for dtype, t in TL_DTYPE_NAMES.items():
        prec = "ieee" if dtype == torch.float32 else "tf32"
        # Inner strides are 1 at every launch (the launchers make inputs contiguous) and the JIT turns an
        # integer argument equal to 1 into a constant, so the specs do the same.
        bm, bn, bk, gm, warps, stages = _FWD_CONFIGS[dtype]
        sig = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "h_ptr": f"*{t}", "a_ptr": f"*{t}", **ints,
               "stride_xm": "i32", "stride_xk": "constexpr", "stride_wn": "i32", "stride_wk": "constexpr",
               **{c: "constexpr" for c in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EVEN_K", "STORE_PRE",
                                           "INPUT_PRECISION")}}
        for store, even_k in flags:
            consts = {"stride_xk": 1, "stride_wk": 1, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm,
                      "EVEN_K": even_k, "STORE_PRE": store, "INPUT_PRECISION": prec}
            for label, marked in _markings("fwd", sig, even_k):
                specs.append(KernelSpec(f"projector_fwd {t} {bm}x{bn}x{bk} EVEN_K={even_k} STORE_PRE={store}{label}",
                                        _linear_bias_gelu_fwd_kernel, sig, consts, warps, stages, marked))
        bm, bn, bk, gm, warps, stages = _BWD_CONFIGS[dtype]
        sig = {"dy_ptr": f"*{t}", "w_ptr": f"*{t}", "h_ptr": f"*{t}", "dh_ptr": f"*{t}", "a_ptr": f"*{t}",
               "dbias_ptr": "*fp32", **ints,
               "stride_dym": "i32", "stride_dyk": "constexpr", "stride_wk": "i32", "stride_wn": "constexpr",
               **{c: "constexpr" for c in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EVEN_K", "STORE_ACT",
                                           "INPUT_PRECISION")}}
        for store, even_k in flags:
            consts = {"stride_dyk": 1, "stride_wn": 1, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm,
                      "EVEN_K": even_k, "STORE_ACT": store, "INPUT_PRECISION": prec}
            for label, marked in _markings("bwd", sig, even_k):
                specs.append(KernelSpec(f"projector_bwd {t} {bm}x{bn}x{bk} EVEN_K={even_k} STORE_ACT={store}{label}",
                                        _gelu_grad_matmul_kernel, sig, consts, warps, stages, marked))
    return specs
