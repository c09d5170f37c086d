"""LM head + cross-entropy without materializing the (T, V) logits.

Shapes: T tokens, D hidden width, V vocabulary, C tokens per chunk. Suffix legend: hidden_TD,
weight_VD, labels_T, logits_CV (one chunk), dhidden_TD, dweight_VD.

Triton path (backend="triton"): tokens are processed C at a time. For each chunk
  1. logits_CV = hidden_CD @ weight_VD.T           (cuBLAS, in the input dtype, fp32 accumulation)
  2. ONE Triton kernel per row: logsumexp in fp32 (online max/sum over V blocks), the row's loss, and
     d loss / d logits = softmax - onehot written IN PLACE over logits_CV (zero for ignored rows)
  3. dhidden_CD = dlogits_CV @ weight_VD            (cuBLAS, written straight into its rows of dhidden_TD)
     dweight_VD += dlogits_CV.T @ hidden_CD         (cuBLAS; accumulated in fp32 across chunks)
The gradients are computed during the forward (the loss is a scalar, so the backward only scales them
by grad_output): no logits recompute, one (C, V) buffer alive at a time. See docs/kernels.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from ._aot import TL_DTYPE_NAMES, KernelSpec
from ._backend import new_output, pick_backend
from ._library import custom_op, has_values, linear_cross_entropy_flops, no_tensor

BACKENDS = ("torch", "triton")


def fused_linear_cross_entropy_reference(hidden, weight, labels, *, ignore_index=-100, reduction="sum"):
    """hidden (T, D), weight (V, D), labels (T,) -> scalar loss; logits in fp32."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


# ----------------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _ce_loss_grad_kernel(
    # One program handles ROWS rows of the chunk: their losses, and (COMPUTE_GRAD) their logits overwritten
    # by d loss_row / d logits = softmax(logits) - onehot(label), all arithmetic in fp32.
    logits_ptr,  # logits_CV, rows contiguous; overwritten in place with the gradient
    labels_ptr,  # labels_C int64
    loss_ptr,  # out loss_C fp32: per-row loss, 0 for ignored rows
    C,
    V,
    stride_row,  # row stride of logits_CV
    ignore_index,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < C
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row  # (ROWS, 1)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    offs = tl.arange(0, BLOCK_V)[None, :]

    # pass 1: running max and rescaled sum of exponentials per (row, lane), merged across lanes at the end
    m = tl.full((ROWS, BLOCK_V), float("-inf"), dtype=tl.float32)
    s = tl.zeros((ROWS, BLOCK_V), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = row_ok[:, None] & (start + offs < V)
        x = tl.load(row_ptrs + start + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # lanes that have seen only padding keep m = -inf: keep s = 0 instead of 0 * exp(nan)
        s = tl.where(m_new == float("-inf"), 0.0, s * tl.exp(m - m_new) + tl.exp(x - m_new))
        m = m_new
    m_row = tl.max(m, axis=1)
    m_safe = tl.where(m_row == float("-inf"), 0.0, m_row)  # only rows past C are all padding
    lse = m_safe + tl.log(tl.sum(s * tl.exp(m - m_safe[:, None]), axis=1))

    valid = row_ok & (labels != ignore_index)
    target = tl.load(logits_ptr + rows.to(tl.int64) * stride_row + labels, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + rows, tl.where(valid, lse - target, 0.0), mask=row_ok)

    if COMPUTE_GRAD:
        # pass 2: softmax - onehot; an ignored row gets an all-zero gradient
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = row_ok[:, None] & (cols < V)
            x = tl.load(row_ptrs + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse[:, None]) - tl.where(cols == labels[:, None], 1.0, 0.0)
            g = tl.where(valid[:, None], g, 0.0)
            tl.store(row_ptrs + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launcher

# (ROWS, BLOCK_V, num_warps): a row of the LLaMA vocabulary (32000) is 8 blocks of 4096, one row per
# program (Liger-style); on a GPU every vocabulary takes this one. In the interpreter, small vocabularies
# (tests, tiny models) take 8 rows x 1024, so it runs 8x fewer programs (~30 ms each on CPU). The 8 x 1024
# tile is not compiled for GPUs: it spilled 8 B/thread on sm_80 in fp16 with V a multiple of 16
# (compile check, 2026-12-06), and what a GPU gains from it is for vocabularies below 8192 only.
_CONFIGS = [(8, 1024, 8), (1, 4096, 8)]
_GPU_CONFIG = _CONFIGS[1]
# Written out at the launch: left out, Triton launches with its default (3 stages on NVIDIA GPUs), which is
# not what aot_specs() compiles and checks (found by tests/ops/test_new_shapes.py).
_NUM_STAGES = 1


def _config(V, on_gpu):
    return _GPU_CONFIG if on_gpu or V >= 8192 else _CONFIGS[0]


# Fewest tokens per chunk. Each chunk that trains the LM head re-reads and re-writes the (V, D) fp32 weight
# gradient and writes its (V, D) product: 12 V D bytes against the chunk's 6 C V D FLOPs, C / 2 FLOPs per
# byte. Under the rule C = T D / V alone, chunks thin out as V grows: 192 rows at Qwen2.5-7B's V=152064,
# D=3584, T=8192, i.e. 43 chunks and 281 GB of gradient traffic (84 ms at H100's 3.35 TB/s, against 27 ms
# for the 26.8 TFLOP of GEMMs at its 989 TFLOP/s); Qwen2.5-0.5B (D=896) would take 170 chunks. With at
# least 2048 rows the traffic is at most 2 x 295 / 2048 = 29% of the GEMM time on an H100 (4 chunks,
# 26 GB at that shape), and LLaVA-1.5's shapes keep their chunks (2096 rows at V=32000, D=4096).
# Arithmetic from datasheet peaks, not a measurement: benchmarks/bench_flce.py times these shapes on a GPU.
_MIN_CHUNK_ROWS = 2048


def _chunk_rows(T, V, D):
    """Tokens per chunk: T D / V (the (C, V) logits chunk no larger than hidden_TD itself), but at least
    _MIN_CHUNK_ROWS so the passes over the (V, D) weight gradient stay few at large vocabularies; at most
    T; a multiple of 8 for the GEMMs.

    T=16384, V=32000, D=4096 gives C=2096: 8 chunks, 134 MB of bf16 logits per chunk, against eager's
    1.05 GB of bf16 plus 2.1 GB of fp32 (T, V) logits. T=8192, V=152064, D=3584 gives C=2048: 4 chunks,
    623 MB of bf16 logits per chunk (the (V, D) gradient buffers are 3.3 GB), against eager's 2.5 GB of
    bf16 plus 5 GB of fp32 logits.
    """
    c = max((T * D) // max(V, 1), _MIN_CHUNK_ROWS)
    return max(8, min(T, c) // 8 * 8) if T > 8 else max(T, 1)


def _loss_and_grads(hidden_TD, weight_VD, labels_T, ignore_index, need_dhidden, need_dweight):
    """Summed loss (fp32 scalar), dhidden_TD and dweight_VD of the summed loss (None when not needed)."""
    T, D = hidden_TD.shape
    V = weight_VD.shape[0]
    C = _chunk_rows(T, V, D)
    rows, block_v, warps = _config(V, hidden_TD.is_cuda)
    compute_grad = need_dhidden or need_dweight
    loss_T = new_output((T,), torch.float32, hidden_TD.device)
    dhidden_TD = new_output((T, D), hidden_TD.dtype, hidden_TD.device) if need_dhidden else None
    dweight_VD = None  # fp32 accumulator, created by the first chunk
    for start in range(0, T, C):
        end = min(start + C, T)
        hidden_CD = hidden_TD[start:end]
        logits_CV = hidden_CD @ weight_VD.t()
        _ce_loss_grad_kernel[(triton.cdiv(end - start, rows),)](
            logits_CV, labels_T[start:end], loss_T[start:end], end - start, V, logits_CV.stride(0), ignore_index,
            ROWS=rows, BLOCK_V=block_v, COMPUTE_GRAD=compute_grad, num_warps=warps, num_stages=_NUM_STAGES,
        )
        if need_dhidden:
            torch.mm(logits_CV, weight_VD, out=dhidden_TD[start:end])
        if need_dweight:
            # fp32 accumulation: rounding the running sum to 16 bits once per chunk would add error
            # that grows with the number of chunks; the (V, D) product itself is one cuBLAS GEMM.
            part = logits_CV.t() @ hidden_CD
            if dweight_VD is None:
                dweight_VD = part.float() if part.dtype != torch.float32 else part
            else:
                dweight_VD += part
            del part
        del logits_CV
    if need_dweight and dweight_VD is None:  # T == 0
        dweight_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device)
    return loss_T.sum(), dhidden_TD, dweight_VD


# torch's reduction enum, as aten.nll_loss_forward takes it
_REDUCTION = {"sum": 2, "mean": 1}


def _torch_forward(hidden_TD, weight_VD, labels_T, ignore_index, reduction, need_grad):
    """F.cross_entropy(F.linear(hidden, weight).float(), ...) as the aten ops autograd would record
    (log_softmax, nll_loss_forward); returns the loss and what the backward reads: the (T, V) fp32
    log-probabilities (when a backward will run) and nll_loss's total weight."""
    logp_TV = torch.log_softmax(F.linear(hidden_TD, weight_VD).float(), dim=-1)
    loss, total_weight = torch.ops.aten.nll_loss_forward(logp_TV, labels_T, None, _REDUCTION[reduction], ignore_index)
    return loss, (logp_TV if need_grad else no_tensor(loss)), total_weight


def _torch_backward(grad_loss, hidden_TD, weight_VD, labels_T, logp_TV, total_weight, ignore_index, reduction,
                    need_dhidden, need_dweight):
    """The aten backward formulas of the ops _torch_forward ran, in autograd's order."""
    dlogp_TV = torch.ops.aten.nll_loss_backward(grad_loss, logp_TV, labels_T, None, _REDUCTION[reduction],
                                                ignore_index, total_weight)
    dlogits_TV = torch.ops.aten._log_softmax_backward_data(dlogp_TV, logp_TV, 1, torch.float32).to(hidden_TD.dtype)
    dhidden = dlogits_TV.mm(weight_VD) if need_dhidden else None
    dweight = dlogits_TV.t().mm(hidden_TD) if need_dweight else None
    return dhidden, dweight


def _check_values(labels_T, V, ignore_index):
    """Labels in [0, V) or ignore_index: the Triton kernel indexes the logits row with them. ValueError in
    the interpreter (CPU: it reads values anyway), torch._assert_async on CUDA (no host sync)."""
    bad = (labels_T != ignore_index) & ((labels_T < 0) | (labels_T >= V))
    if labels_T.is_cuda:
        torch._assert_async(~bad.any(), f"fused_linear_cross_entropy: a label is outside [0, {V}) and is not "
                                        f"ignore_index={ignore_index}")
    elif bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"fused_linear_cross_entropy: label {int(labels_T[pos])} at position {pos} is outside "
                         f"[0, {V}) and is not ignore_index={ignore_index}")


@custom_op("fused_linear_cross_entropy")
def _flce_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str,
             need_dhidden: bool, need_dweight: bool, backend: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss () fp32, saved_a, saved_b): what the backward reads. Triton: dhidden (T, D) and the fp32
    dweight (V, D) of the SUMMED loss, computed here, each (0,) when not wanted. Torch: the (T, V) fp32
    log-probabilities ((0,) without a backward) and nll_loss's total weight ()."""
    if backend != "triton":
        return _torch_forward(hidden, weight, labels, ignore_index, reduction, need_dhidden or need_dweight)
    _check_values(labels, weight.shape[0], ignore_index)
    loss_sum, dhidden, dweight = _loss_and_grads(hidden, weight, labels, ignore_index, need_dhidden, need_dweight)
    # mean: all labels ignored gives 0 / 0 = nan, like torch's cross_entropy
    loss = loss_sum if reduction == "sum" else loss_sum / (labels != ignore_index).sum().float()
    return loss, (dhidden if need_dhidden else no_tensor(hidden)), (dweight if need_dweight else no_tensor(loss))


@_flce_op.register_fake
def _(hidden, weight, labels, ignore_index, reduction, need_dhidden, need_dweight, backend):
    loss = hidden.new_empty((), dtype=torch.float32)
    if backend != "triton":
        need = need_dhidden or need_dweight
        logp = hidden.new_empty((hidden.shape[0], weight.shape[0]), dtype=torch.float32) if need else no_tensor(loss)
        return loss, logp, hidden.new_empty((), dtype=torch.float32)
    return (loss, hidden.new_empty(hidden.shape) if need_dhidden else no_tensor(hidden),
            weight.new_empty(weight.shape, dtype=torch.float32) if need_dweight else no_tensor(loss))


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, ignore_index, reduction, need_dhidden, need_dweight, backend = inputs
    _, saved_a, saved_b = output
    ctx.save_for_backward(hidden, weight, labels, saved_a, saved_b)
    ctx.args = (ignore_index, reduction, need_dhidden, need_dweight, backend)
    ctx.weight_dtype = weight.dtype
    ctx.mark_non_differentiable(saved_a, saved_b)
    ctx.consumed = False


def _backward(ctx, grad_loss, _da, _db):
    ignore_index, reduction, need_dhidden, need_dweight, backend = ctx.args
    if backend != "triton":
        hidden, weight, labels, logp, total_weight = ctx.saved_tensors
        dhidden, dweight = _torch_backward(grad_loss, hidden, weight, labels, logp, total_weight, ignore_index,
                                           reduction, need_dhidden, need_dweight)
        return dhidden, dweight, None, None, None, None, None, None
    if ctx.consumed:
        raise RuntimeError("fused_linear_cross_entropy: the gradients were computed in the forward and "
                           "already handed out; a second backward (retain_graph=True) is not supported")
    ctx.consumed = True
    _, _, labels, dhidden, dweight = ctx.saved_tensors
    scale = grad_loss
    if reduction == "mean":
        # gradients of an all-ignored batch are 0 (torch gives 0 too), never 0 * inf
        scale = grad_loss * (1.0 / (labels != ignore_index).sum().float().clamp(min=1.0))
    # The buffers were made by the forward for this backward only: scaled in place in eager, no second
    # copy. A traced backward (torch.compile; fake tensors) must not mutate a saved tensor: out of place,
    # the compiler plans that memory itself.
    if has_values(dhidden):
        dh = dhidden.mul_(scale.to(dhidden.dtype)) if need_dhidden else None
        dw = dweight.mul_(scale).to(ctx.weight_dtype) if need_dweight else None
    else:
        dh = dhidden * scale.to(dhidden.dtype) if need_dhidden else None
        dw = (dweight * scale).to(ctx.weight_dtype) if need_dweight else None
    return dh, dw, None, None, None, None, None, None


_flce_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.fastllava.fused_linear_cross_entropy)
def _flops(hidden_shape, weight_shape, labels_shape, ignore_index, reduction, need_dhidden, need_dweight, backend,
           *, out_shape=None):
    """The LM-head GEMM (2 T D V), plus, for Triton, the gradient GEMMs it runs in the forward (2 T D V
    each for dhidden and dweight). The torch backward's GEMMs are aten.mm calls, counted by torch."""
    (T, D), V = hidden_shape, weight_shape[0]
    grads = (need_dhidden + need_dweight) if backend == "triton" else 0
    return linear_cross_entropy_flops(T, D, V, 1 + grads)


def _check_inputs(hidden, weight, labels, backend):
    """Metadata only (runs on fake tensors and under torch.compile); label values are checked in the op."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden must be (T, D) and weight (V, D) with the same D, "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"fused_linear_cross_entropy: labels must be (T={hidden.shape[0]},), got {tuple(labels.shape)}")
    if backend == "triton" and (hidden.dtype != weight.dtype or hidden.dtype not in TL_DTYPE_NAMES):
        raise ValueError(f"fused_linear_cross_entropy (triton): hidden and weight must share one dtype among "
                         f"fp16/bf16/fp32, got {hidden.dtype} and {weight.dtype}")


def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="sum", backend="auto"):
    """Cross-entropy of softmax(hidden @ weight.T) against labels (already shifted by the caller).

    hidden: (T, D); weight: (V, D) in nn.Linear layout; labels: (T,) int64 with ignore_index where no loss.
    reduction: "sum" (what global token normalization needs) or "mean" over non-ignored labels
    (all labels ignored: "sum" gives 0, "mean" gives nan like torch, with zero gradients).
    Returns a scalar fp32 tensor.
    Runs as the custom op torch.ops.fastllava.fused_linear_cross_entropy (fake implementation, registered
    backward, FLOP formula: see docs/kernels.md), both backends; neither reads a value on the host on
    CUDA (Triton's label check is a torch._assert_async there).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'sum' or 'mean', got {reduction!r}")
    which = pick_backend(backend, hidden, BACKENDS, op="fused_linear_cross_entropy")
    _check_inputs(hidden, weight, labels, which)
    grad = torch.is_grad_enabled()
    need_dhidden, need_dweight = grad and hidden.requires_grad, grad and weight.requires_grad
    if which == "triton":
        hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.long().contiguous()
    loss, _, _ = torch.ops.fastllava.fused_linear_cross_entropy(hidden, weight, labels, int(ignore_index), reduction,
                                                                need_dhidden, need_dweight, which)
    return loss


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile check


# The integers a launch marks as multiples of 16 (see _aot.default_divisible): the vocabulary (and the
# logits' row stride, which equals it) is one for every released vocabulary (32000, 32064, 128256, 151936,
# 152064) and not for the tests' odd ones; the chunk's rows are one except in a ragged last chunk.
_MARKINGS = {"": (), " V%16=0": ("V", "stride_row"), " V,C%16=0": ("V", "stride_row", "C")}


def aot_specs() -> list[KernelSpec]:
    """Every (dtype, COMPUTE_GRAD, integers marked divisible by 16) the launcher can produce on a GPU."""
    specs = []
    for t in TL_DTYPE_NAMES.values():
        sig = {"logits_ptr": f"*{t}", "labels_ptr": "*i64", "loss_ptr": "*fp32", "C": "i32", "V": "i32",
               "stride_row": "i32", "ignore_index": "i32", "ROWS": "constexpr", "BLOCK_V": "constexpr",
               "COMPUTE_GRAD": "constexpr"}
        pointers = tuple(n for n, typ in sig.items() if typ.startswith("*"))
        for rows, block_v, warps in (_GPU_CONFIG,):
            for grad in (True, False):
                for label, ints in _MARKINGS.items():
                    specs.append(KernelSpec(
                        f"ce_loss_grad {t} ROWS={rows} BLOCK_V={block_v} COMPUTE_GRAD={grad}{label}",
                        _ce_loss_grad_kernel, sig, {"ROWS": rows, "BLOCK_V": block_v, "COMPUTE_GRAD": grad},
                        warps, _NUM_STAGES, divisible_by_16=pointers + ints))
    return specs
