"""Sequence-packed (varlen) attention: causal inside each sample, never across samples.

FlashAttention-2 over `cu_seqlens` in Triton (forward, backward, GQA/MQA), a per-sample torch reference
(the tests' oracle), a padded one-call torch path (the CPU backend), the custom op
`fastllava::varlen_attention` both of those run as, and the dispatch to the other backends (torch's
`varlen_attn`, flash-attn, xformers). Algorithm, block sizes and the determinism choice are explained
in docs/kernels-attention.md; the custom op in docs/kernels.md.

Shapes: T packed tokens, B samples, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), D head dim.
Suffixes: q_THD is (T, Hq, D), lse_HT is (Hq, T).
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch
import torch.nn.functional as F
import triton
from torch.utils.flop_counter import register_flop_formula

from ..extras import require
from ._aot import TL_DTYPE_NAMES, KernelSpec
from ._backend import new_output, pick_backend
from ._library import attention_flops, custom_op, sum_sq_lengths
from .varlen_attention_kernels import (
    _varlen_bwd_delta_kernel,
    _varlen_bwd_dkdv_kernel,
    _varlen_bwd_dq_kernel,
    _varlen_fwd_kernel,
)

BACKENDS = ("triton", "torch", "torch_varlen", "flash_attn", "xformers")
TRITON_HEAD_DIMS = (64, 80, 96, 128)
_DTYPES = tuple(TL_DTYPE_NAMES)  # fp16, bf16, fp32
# On a GPU the kernels run in fp16/bf16; fp32 exists for the interpreter tests (its IEEE dot holds
# operands in registers: the dk/dv kernel spills at D=128), so fp32 CUDA inputs go to the reference.
_GPU_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Launch configurations: the only place block sizes live; aot_specs() enumerates exactly these.
# ----------------------------------------------------------------------------------------------------

def _kernel_config(kind: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options for kernel `kind` ("fwd", "dq", "dkdv", "delta").

    Chosen without a GPU from the compile check (no spills, shared memory within sm_80's limit); see
    docs/kernels-attention.md for the table and the reasoning. fp32 exists for tests only and takes
    small tiles because its IEEE dot runs on FMA units and holds operands in registers.
    The launchers call this at every launch, so a test can monkeypatch it to run other tiles.
    """
    if kind == "delta":
        return dict(BLOCK_T=64, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    wide = triton.next_power_of_2(head_dim) > 64
    if kind == "fwd":
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8 if wide else 4, num_stages=3)
    if kind == "dq":
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if wide else 4, num_stages=2)
    if kind == "dkdv":
        # k, v, dk, dv (BLOCK_N x D) stay in registers for the whole loop: with D=128, BLOCK_M=32
        # spilled 56 B (sm_90) and BLOCK_M=64 416 B; with D=64, BLOCK_M=32 still spilled 16 B on sm_90
        # (causal). BLOCK_M=16 is the largest without spills for every head dim.
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=8 if wide else 4, num_stages=2)
    raise AssertionError(kind)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype the kernels write: the input's, except fp32 for bf16 in the interpreter, whose fp32 -> bf16
    cast truncates instead of rounding to nearest (measured, Triton 3.9: 487 of 1024 random values off by
    one ulp); torch rounds those buffers afterwards."""
    return torch.float32 if (x.dtype == torch.bfloat16 and not x.is_cuda) else x.dtype


def _alloc(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return new_output(shape, dtype or _out_dtype(like), like.device)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels take token/head strides but assume unit stride along D."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _common_constexprs(q: torch.Tensor, causal: bool) -> dict:
    D = q.shape[-1]
    return dict(
        CAUSAL=causal, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
        # The 3.9 interpreter computes bf16 arithmetic wrongly (measured with Triton 3.9); on CPU tensors
        # (interpreter only) bf16 tiles are widened right after loading. GPUs keep bf16 for tensor cores.
        UPCAST=(q.dtype == torch.bfloat16 and not q.is_cuda),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _launch_forward(q_THD, k_THD, v_THD, cu_seqlens, max_seqlen, causal, sm_scale):
    T, Hq, D = q_THD.shape
    B = cu_seqlens.numel() - 1
    o_THD = _alloc(q_THD.shape, q_THD)
    lse_HT = _alloc((Hq, T), q_THD, torch.float32)
    if T == 0 or B == 0 or max_seqlen == 0:
        return o_THD.to(q_THD.dtype), lse_HT
    cfg = _kernel_config("fwd", D, q_THD.dtype)
    grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]), Hq, B)
    _varlen_fwd_kernel[grid](
        q_THD, k_THD, v_THD, o_THD, lse_HT, cu_seqlens, sm_scale,
        q_THD.stride(0), q_THD.stride(1), k_THD.stride(0), k_THD.stride(1), v_THD.stride(0), v_THD.stride(1),
        o_THD.stride(0), o_THD.stride(1), T, Hq // k_THD.shape[1],
        **_common_constexprs(q_THD, causal), **cfg,
    )
    return o_THD.to(q_THD.dtype), lse_HT


def _launch_backward(do_THD, q_THD, k_THD, v_THD, o_THD, lse_HT, cu_seqlens, max_seqlen, causal, sm_scale):
    T, Hq, D = q_THD.shape
    Hkv = k_THD.shape[1]
    B = cu_seqlens.numel() - 1
    dq_THD, dk_THD, dv_THD = _alloc(q_THD.shape, q_THD), _alloc(k_THD.shape, k_THD), _alloc(v_THD.shape, v_THD)
    if T == 0 or B == 0 or max_seqlen == 0:
        return dq_THD.to(q_THD.dtype), dk_THD.to(q_THD.dtype), dv_THD.to(q_THD.dtype)
    common = _common_constexprs(q_THD, causal)
    delta_HT = _alloc((Hq, T), q_THD, torch.float32)
    # The interpreter's bf16 path writes gradients in fp32 (see _out_dtype); the kernels read the
    # element type from the pointer, so nothing else changes.
    cfg = _kernel_config("delta", D, q_THD.dtype)
    _varlen_bwd_delta_kernel[(triton.cdiv(T, cfg["BLOCK_T"]), Hq)](
        o_THD, do_THD, delta_HT, o_THD.stride(0), o_THD.stride(1), do_THD.stride(0), do_THD.stride(1), T,
        HEAD_DIM=D, BLOCK_D=common["BLOCK_D"], **cfg,
    )
    group = Hq // Hkv
    cfg = _kernel_config("dq", D, q_THD.dtype)
    _varlen_bwd_dq_kernel[(triton.cdiv(max_seqlen, cfg["BLOCK_M"]), Hq, B)](
        q_THD, k_THD, v_THD, do_THD, dq_THD, lse_HT, delta_HT, cu_seqlens, sm_scale,
        q_THD.stride(0), q_THD.stride(1), k_THD.stride(0), k_THD.stride(1), v_THD.stride(0), v_THD.stride(1),
        do_THD.stride(0), do_THD.stride(1), dq_THD.stride(0), dq_THD.stride(1), T, group, **common, **cfg,
    )
    cfg = _kernel_config("dkdv", D, q_THD.dtype)
    _varlen_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, cfg["BLOCK_N"]), Hkv, B)](
        q_THD, k_THD, v_THD, do_THD, dk_THD, dv_THD, lse_HT, delta_HT, cu_seqlens, sm_scale,
        q_THD.stride(0), q_THD.stride(1), k_THD.stride(0), k_THD.stride(1), v_THD.stride(0), v_THD.stride(1),
        do_THD.stride(0), do_THD.stride(1), dk_THD.stride(0), dk_THD.stride(1), dv_THD.stride(0), dv_THD.stride(1),
        T, group, **common, **cfg,
    )
    return dq_THD.to(q_THD.dtype), dk_THD.to(q_THD.dtype), dv_THD.to(q_THD.dtype)


# ----------------------------------------------------------------------------------------------------
# The torch backend: the samples padded into one (B, H, L, D) batch, L = max_seqlen, and one attention
# call, instead of the reference's call per sample, whose per-call overhead dominated a CPU training
# step. Padding sits at the end of each sample; padded query rows are computed and dropped.
# ----------------------------------------------------------------------------------------------------

def _use_cpu_flash(x: torch.Tensor) -> bool:
    """Whether the torch backend calls torch's CPU flash-attention kernels directly (forward and backward,
    the pair F.scaled_dot_product_attention's autograd runs on CPU, GQA included); elsewhere (fp32 on
    CUDA) the backward recomputes F.scaled_dot_product_attention under torch.func.vjp."""
    return x.device.type == "cpu"


def _padded_rows(cu_seqlens: torch.Tensor, T: int, max_seqlen: int) -> torch.Tensor:
    """(T,) int64: the row of each packed token in the (B * max_seqlen) padded layout. Sizes come from
    shapes and max_seqlen only: no value is read on the host and no shape depends on the data."""
    t = torch.arange(T, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    sample = torch.searchsorted(cu_seqlens[1:], t, right=True)  # empty samples own no token
    return sample * max_seqlen + (t - cu_seqlens[sample])


def _pad(x_THD: torch.Tensor, rows: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """(T, H, D) -> (B, H, L, D), zeros in the padding; differentiable."""
    x = x_THD.new_zeros((B * L, *x_THD.shape[1:])).index_copy(0, rows, x_THD)
    return x.view(B, L, *x_THD.shape[1:]).transpose(1, 2)


def _unpad(x_BHLD: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (T, H, D): the rows of real tokens, in pack order; differentiable."""
    B, H, L, D = x_BHLD.shape
    return x_BHLD.transpose(1, 2).reshape(B * L, H, D).index_select(0, rows)


def _key_mask(cu_seqlens: torch.Tensor, L: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, L) additive mask hiding each sample's padded keys, for `causal=False` (with `causal`,
    padding sits after every real key and is_causal alone is exact). An empty sample keeps key 0 (a zero
    row) so that its all-padding queries stay finite; their outputs are dropped."""
    lens_B = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=1)
    hidden_BL = torch.arange(L, device=cu_seqlens.device) >= lens_B[:, None]
    mask_BL = torch.zeros(hidden_BL.shape, dtype=dtype, device=cu_seqlens.device).masked_fill(hidden_BL, float("-inf"))
    return mask_BL[:, None, None, :]


def _padded_sdpa(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    """One F.scaled_dot_product_attention call over the padded layout, differentiable in q, k, v."""
    B, L = cu_seqlens.numel() - 1, max_seqlen
    rows = _padded_rows(cu_seqlens, q.shape[0], L)
    mask = None if causal else _key_mask(cu_seqlens, L, q.dtype)
    o_BHLD = F.scaled_dot_product_attention(_pad(q, rows, B, L), _pad(k, rows, B, L), _pad(v, rows, B, L),
                                            attn_mask=mask, is_causal=causal, scale=scale,
                                            enable_gqa=k.shape[1] != q.shape[1])
    return _unpad(o_BHLD, rows)


def _lse_meta(q, cu_seqlens, max_seqlen, backend) -> tuple[tuple, torch.dtype]:
    """Shape and dtype of the forward's second output, what the backward reads: the Triton kernel's
    (Hq, T) fp32 log-sum-exp, torch's CPU flash kernel's (B, Hq, max_seqlen) one (padded rows included,
    float64 for float64 inputs), or nothing where the torch backward recomputes."""
    T, Hq, _ = q.shape
    if backend == "triton":
        return (Hq, T), torch.float32
    if _use_cpu_flash(q):
        return (cu_seqlens.shape[0] - 1, Hq, max_seqlen), torch.promote_types(q.dtype, torch.float32)
    return (0,), torch.float32


def _torch_forward(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    lse_shape, lse_dtype = _lse_meta(q, cu_seqlens, max_seqlen, "torch")
    if q.shape[0] == 0:
        return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=lse_dtype)
    if not _use_cpu_flash(q):
        return _padded_sdpa(q, k, v, cu_seqlens, max_seqlen, causal, scale), q.new_empty(lse_shape, dtype=lse_dtype)
    B, L = cu_seqlens.numel() - 1, max_seqlen
    rows = _padded_rows(cu_seqlens, q.shape[0], L)
    mask = None if causal else _key_mask(cu_seqlens, L, q.dtype)
    o_BHLD, lse_BHL = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _pad(q, rows, B, L), _pad(k, rows, B, L), _pad(v, rows, B, L), 0.0, causal, attn_mask=mask, scale=scale)
    return _unpad(o_BHLD, rows), lse_BHL.contiguous()  # strides follow the padded layout's: fix them


def _torch_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, scale):
    if q.shape[0] == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    if not _use_cpu_flash(q):
        _, vjp = torch.func.vjp(lambda q_, k_, v_: _padded_sdpa(q_, k_, v_, cu_seqlens, max_seqlen, causal, scale),
                                q, k, v)
        return vjp(do)
    B, L = cu_seqlens.numel() - 1, max_seqlen
    rows = _padded_rows(cu_seqlens, q.shape[0], L)
    mask = None if causal else _key_mask(cu_seqlens, L, q.dtype)
    # Padded rows of o are zeros here (the forward's values there were dropped): with zero dO they
    # contribute exactly nothing (dS = P * (dP - delta) = 0), so the real rows' gradients are unchanged.
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _pad(do, rows, B, L), _pad(q, rows, B, L), _pad(k, rows, B, L), _pad(v, rows, B, L), _pad(o, rows, B, L),
        lse, 0.0, causal, attn_mask=mask, scale=scale)
    return _unpad(dq, rows), _unpad(dk, rows), _unpad(dv, rows)


# ----------------------------------------------------------------------------------------------------
# The custom ops: fastllava::varlen_attention and its backward (fake implementations, autograd, FLOPs).
# ----------------------------------------------------------------------------------------------------

def _check_values(cu_seqlens, T, max_seqlen, backend):
    """cu_seqlens against T and max_seqlen. The Triton interpreter (CPU) reads everything on the host
    anyway: ValueError. Elsewhere a device-side assert: reading the values would synchronize a GPU
    stream (and is a host read inside the training step on CPU), the assert keeps the launch
    asynchronous but turns a malformed cu_seqlens into an error instead of silent garbage."""
    where = f"varlen_attention(backend={backend!r})"
    if backend != "triton" or cu_seqlens.is_cuda:
        lens = cu_seqlens.diff()
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == T) & (lens >= 0).all() & (lens <= max_seqlen).all()
        torch._assert_async(ok, f"{where}: cu_seqlens must start at 0, end at T, be non-decreasing and have "
                                "no sample longer than max_seqlen")
        return
    bounds = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(f"{where}: cu_seqlens must start at 0 and end at T={T}; got {bounds[0]} .. {bounds[-1]}")
    bad = next((i for i, n in enumerate(lens) if n < 0), None)
    if bad is not None:
        raise ValueError(f"{where}: cu_seqlens must be non-decreasing; sample {bad} has length {lens[bad]}")
    if lens and max(lens) > max_seqlen:
        raise ValueError(f"{where}: max_seqlen={max_seqlen} is shorter than sample {lens.index(max(lens))} "
                         f"of length {max(lens)}")


@custom_op("varlen_attention")
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, causal: bool, scale: float, backend: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o (T, Hq, D), lse): see _lse_meta for the second output. backend: "triton" or "torch"."""
    _check_values(cu_seqlens, q.shape[0], max_seqlen, backend)
    if backend == "triton":
        return _launch_forward(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    return _torch_forward(q, k, v, cu_seqlens, max_seqlen, causal, scale)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale, backend):
    lse_shape, lse_dtype = _lse_meta(q, cu_seqlens, max_seqlen, backend)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=lse_dtype)


@custom_op("varlen_attention_backward")
def _varlen_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  o: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                  causal: bool, scale: float, backend: str
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's inputs, output and lse."""
    if backend == "triton":
        return _launch_backward(_unit_last(do), q, k, v, o, lse, cu_seqlens, max_seqlen, causal, scale)
    return _torch_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, scale)


@_varlen_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, scale, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.args = (max_seqlen, causal, scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastllava.varlen_attention_backward(do, q, k, v, o, lse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_varlen_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _op_flops(q, cu_seqlens, max_seqlen, causal, backward) -> int:
    """In the one convention of _library.attention_flops (causal: half of sum_i l_i^2 pairs; backward 2x)."""
    T, Hq, D = q.shape
    return attention_flops(Hq, D, sum_sq_lengths(cu_seqlens, T, max_seqlen), causal=causal, backward=backward)


@register_flop_formula(torch.ops.fastllava.varlen_attention, get_raw=True)
def _forward_flops(q, k, v, cu_seqlens, max_seqlen, causal, scale, backend, *, out_val=None):
    return _op_flops(q, cu_seqlens, max_seqlen, causal, backward=False)


@register_flop_formula(torch.ops.fastllava.varlen_attention_backward, get_raw=True)
def _backward_flops(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, scale, backend, *, out_val=None):
    return _op_flops(q, cu_seqlens, max_seqlen, causal, backward=True)


# ----------------------------------------------------------------------------------------------------
# Argument checks, reference, other backends, dispatch.
# ----------------------------------------------------------------------------------------------------

def _check_args(q, k, v, cu_seqlens, max_seqlen, backend):
    """Metadata only (shapes, dtypes, devices): nothing here reads a tensor's values, so it runs on fake
    tensors and under torch.compile. Values are checked inside the op (_check_values)."""
    where = f"varlen_attention(backend={backend!r})"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{where}: {name} must be a 3-D tensor (tokens, heads, head_dim), got "
                             f"{getattr(x, 'shape', type(x))}")
    allowed = _DTYPES if backend == "triton" else (*_DTYPES, torch.float64)  # the reference runs float64 too
    if q.dtype not in allowed or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{where}: q, k, v must share one dtype of {allowed}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    T, Hq, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"{where}: k/v {tuple(k.shape)} must be (T={T}, Hkv, D={D}) to match q {tuple(q.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"{where}: query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(f"{where}: q, k, v, cu_seqlens must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}, {cu_seqlens.device}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{where}: cu_seqlens must be a non-empty 1-D int32 tensor (B + 1,); got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise ValueError(f"{where}: max_seqlen must be a non-negative Python int (the longest sample), got "
                         f"{max_seqlen!r}")
    if backend == "triton" and D not in TRITON_HEAD_DIMS:
        raise ValueError(f"{where}: head_dim {D} is not compiled for the Triton kernel; supported: "
                         f"{TRITON_HEAD_DIMS} (or use backend='torch')")


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None):
    """Per-sample scaled_dot_product_attention. q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        q_HLD = q[start:end].transpose(0, 1)
        k_HLD = k[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        v_HLD = v[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        o_HLD = F.scaled_dot_product_attention(q_HLD, k_HLD, v_HLD, is_causal=causal, scale=scale)
        out[start:end] = o_HLD.transpose(0, 1)
    return out


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    """torch.nn.attention.varlen.varlen_attn: `scale=` and `window_size=(-1, 0)` for causal (torch >= 2.11;
    2.10's `is_causal` is gone). GQA: `enable_gqa` is in torch 2.12 and 2.13 (2.13's signature read here);
    it came with pytorch PR #179468 (April 2026), after the 2.11 branch was cut, so torch 2.11 most likely
    lacks it (not read from a 2.11 install). Without it, K/V heads are repeated. Both branches run on CPU
    in tests/ops/test_varlen_attention.py against a stand-in varlen_attn with and without `enable_gqa`."""
    from torch.nn.attention.varlen import varlen_attn

    kw = dict(scale=softmax_scale, window_size=(-1, 0) if causal else (-1, -1))
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            kw["enable_gqa"] = True
        else:  # torch 2.11
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)


# Backends that call another library -> the module each imports (fastllava/extras.py: the extra to install).
LIBRARY_MODULES = {"flash_attn": "flash_attn", "xformers": "xformers.ops"}


def require_backend(backend: str, feature: str | None = None):
    """The library module that `backend` calls, imported (None for a backend of torch or ours); MissingExtra
    naming `feature` (default: this op with that backend) and the extra when the library is not installed."""
    module = LIBRARY_MODULES.get(backend)
    if module is None:
        return None
    return require(module, feature or f"varlen_attention(backend={backend!r})")


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    flash_attn = require_backend("flash_attn")
    return flash_attn.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                             softmax_scale=softmax_scale, causal=causal)


def _xformers(q, k, v, cu_seqlens, causal, softmax_scale):
    """xformers' memory_efficient_attention on the pack as one (1, T, H, D) batch with a block-diagonal
    mask (causal inside each block when `causal`). GQA: K/V heads repeated to Hq (the autograd of the
    repeat sums their gradients back), which costs (group - 1) extra copies of K and V."""
    memory_efficient_attention = require_backend("xformers").memory_efficient_attention
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask, BlockDiagonalMask
    # Host sync: the mask is built from the sample lengths as Python ints, so cu_seqlens is read back
    # from the GPU on every call (the triton and torch_varlen backends never do this).
    bounds = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]  # an empty sample holds no token
    if not lens:
        return q.clone()  # T == 0: an empty output that still belongs to the graph
    mask_cls = BlockDiagonalCausalMask if causal else BlockDiagonalMask
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    o_1THD = memory_efficient_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                        attn_bias=mask_cls.from_seqlens(lens), scale=softmax_scale)
    return o_1THD.squeeze(0)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None, backend="auto"):
    """Attention over packed samples, differentiable in q, k, v.

    q: (T, Hq, D); k and v: (T, Hkv, D) with Hq % Hkv == 0 (GQA/MQA); one dtype (fp16, bf16, fp32) and
    device. cu_seqlens: (B + 1,) int32, cu_seqlens[0] = 0, cu_seqlens[-1] = T, non-decreasing (empty
    samples allowed). max_seqlen: int, >= the longest sample (it sizes the launch grid, and the torch
    backend's padded layout: B x max_seqlen rows, so no shape depends on cu_seqlens' values).
    causal: mask future tokens inside each sample. softmax_scale: default 1/sqrt(D).
    backend: "auto" (Triton on CUDA, torch elsewhere) or one of BACKENDS:
      "triton"        our FlashAttention-2 kernels (CUDA; CPU through Triton's interpreter, for tests);
      "torch"         the samples padded into one batch, torch's CPU flash-attention kernel (one call
                      forward, one backward; elsewhere one scaled_dot_product_attention call);
      "torch_varlen"  torch.nn.attention.varlen.varlen_attn (CUDA only);
      "flash_attn"    flash_attn_varlen_func, if the flash-attn package is installed (CUDA only);
      "xformers"      xformers' memory_efficient_attention with a block-diagonal mask, if xformers is
                      installed (CUDA only; reads cu_seqlens on the host: one sync per call).
    Returns (T, Hq, D) in q's dtype.
    "triton" and "torch" run as the custom op torch.ops.fastllava.varlen_attention (fake implementation,
    registered backward, FLOP formula: see docs/kernels.md). cu_seqlens values are checked inside it by a
    device-side assert (torch._assert_async: no host sync), by ValueError in the Triton interpreter.
    """
    which = pick_backend(backend, q, BACKENDS, op="varlen_attention")
    if which == "triton" and q.is_cuda and q.dtype not in _GPU_DTYPES:
        if backend != "auto":
            raise ValueError(f"varlen_attention(backend='triton'): on CUDA the kernel takes fp16 or bf16, got "
                             f"{q.dtype}; use backend='torch' (or 'auto') for other dtypes")
        which = "torch"
    _check_args(q, k, v, cu_seqlens, max_seqlen, which)
    if which in ("torch_varlen", "flash_attn", "xformers") and not q.is_cuda:
        raise ValueError(f"varlen_attention: backend={which!r} runs on CUDA tensors only; got {q.device} "
                         f"(use backend='torch' or 'auto' on CPU)")
    if which in ("triton", "torch"):
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        if which == "triton":
            q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, _ = torch.ops.fastllava.varlen_attention(q, k, v, cu_seqlens, int(max_seqlen), bool(causal),
                                                    float(scale), which)
        return o
    # The baselines call their libraries as they are (each registers its own autograd; flash-attn and
    # torch's varlen_attn are torch ops themselves).
    if which == "torch_varlen":
        return _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)
    if which == "flash_attn":
        return _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)
    if which == "xformers":
        return _xformers(q, k, v, cu_seqlens, causal, softmax_scale)
    raise AssertionError(which)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (python -m fastllava.ops.compile_check).
# ----------------------------------------------------------------------------------------------------

_CONSTEXPR_ARGS = {"CAUSAL", "HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "UPCAST", "DOT_PRECISION"}


def aot_specs() -> list[KernelSpec]:
    """Every kernel configuration the launchers above can choose on a GPU."""
    specs = []
    for D in TRITON_HEAD_DIMS:
        for dtype in _GPU_DTYPES:
            t = TL_DTYPE_NAMES[dtype]
            x, f, i = f"*{t}", "*fp32", "i32"
            consts = dict(HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), UPCAST=False,
                          DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
            cfg = _kernel_config("delta", D, dtype)
            specs.append(KernelSpec(
                name=f"varlen_attn_bwd_delta D={D} {t} BLOCK_T={cfg['BLOCK_T']}", fn=_varlen_bwd_delta_kernel,
                signature=dict(O=x, DO=x, DELTA=f, stride_ot=i, stride_oh=i, stride_dot=i, stride_doh=i, T=i,
                               HEAD_DIM="constexpr", BLOCK_D="constexpr", BLOCK_T="constexpr"),
                constexprs=dict(HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"], BLOCK_T=cfg["BLOCK_T"]),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
            for causal in (True, False):
                for kind, fn, ptrs in (
                    ("fwd", _varlen_fwd_kernel, dict(Q=x, K=x, V=x, O=x, LSE=f)),
                    ("dq", _varlen_bwd_dq_kernel, dict(Q=x, K=x, V=x, DO=x, DQ=x, LSE=f, DELTA=f)),
                    ("dkdv", _varlen_bwd_dkdv_kernel, dict(Q=x, K=x, V=x, DO=x, DK=x, DV=x, LSE=f, DELTA=f)),
                ):
                    cfg = _kernel_config(kind, D, dtype)
                    sig = {n: ptrs.get(n, "constexpr" if n in _CONSTEXPR_ARGS else i) for n in fn.arg_names}
                    sig["CU_SEQLENS"], sig["sm_scale"] = "*i32", "fp32"
                    const = {**consts, "CAUSAL": causal, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
                    assert set(const) == {n for n, s in sig.items() if s == "constexpr"}, (kind, sig)
                    specs.append(KernelSpec(
                        name=f"varlen_attn_{kind} D={D} {t} causal={causal} BLOCK_M={cfg['BLOCK_M']} "
                             f"BLOCK_N={cfg['BLOCK_N']}",
                        fn=fn, signature=sig, constexprs=const, num_warps=cfg["num_warps"],
                        num_stages=cfg["num_stages"]))
    return specs
