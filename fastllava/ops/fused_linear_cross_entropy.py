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

from ._aot import TL_DTYPE_NAMES, KernelSpec
from ._backend import new_output, pick_backend

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
# program (Liger-style); small vocabularies (tests, tiny models) take 8 rows x 1024 so a program still
# moves 8K elements per step (and the interpreter runs 8x fewer programs: ~30 ms each on CPU).
_CONFIGS = [(8, 1024, 8), (1, 4096, 8)]


def _config(V):
    return _CONFIGS[0] if V < 8192 else _CONFIGS[1]


def _chunk_rows(T, V, D):
    """Tokens per chunk: the (C, V) logits chunk is kept no larger than hidden_TD itself (C * V <= T * D),
    so the extra memory is bounded by the size of the input; at least 8 rows, a multiple of 8 for the GEMMs.

    T=16384, V=32000, D=4096 gives C=2096: 8 chunks, 134 MB of bf16 logits per chunk, against eager's
    1.05 GB of bf16 plus 2.1 GB of fp32 (T, V) logits.
    """
    c = (T * D) // max(V, 1)
    return max(8, min(T, c) // 8 * 8) if T > 8 else max(T, 1)


def _loss_and_grads(hidden_TD, weight_VD, labels_T, ignore_index, need_dhidden, need_dweight):
    """Summed loss (fp32 scalar), dhidden_TD and dweight_VD of the summed loss (None when not needed)."""
    T, D = hidden_TD.shape
    V = weight_VD.shape[0]
    C = _chunk_rows(T, V, D)
    rows, block_v, warps = _config(V)
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
            ROWS=rows, BLOCK_V=block_v, COMPUTE_GRAD=compute_grad, num_warps=warps,
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


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TD, weight_VD, labels_T, ignore_index, reduction):
        need_dhidden, need_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_sum, dhidden_TD, dweight_VD = _loss_and_grads(
            hidden_TD, weight_VD, labels_T, ignore_index, need_dhidden, need_dweight
        )
        if reduction == "mean":
            n_valid = (labels_T != ignore_index).sum().float()
            loss = loss_sum / n_valid  # all labels ignored: 0 / 0 = nan, like torch's cross_entropy
            # gradients of an all-ignored batch are 0 (torch gives 0 too), never 0 * inf
            grad_scale = 1.0 / n_valid.clamp(min=1.0)
        else:
            loss, grad_scale = loss_sum, None
        ctx.grad_scale = grad_scale
        ctx.weight_dtype = weight_VD.dtype
        ctx.dhidden_TD, ctx.dweight_VD = dhidden_TD, dweight_VD
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError("fused_linear_cross_entropy: the gradients were computed in the forward and "
                               "already handed out; a second backward (retain_graph=True) is not supported")
        ctx.consumed = True
        scale = grad_loss if ctx.grad_scale is None else grad_loss * ctx.grad_scale
        dhidden = dweight = None
        if ctx.dhidden_TD is not None:
            dhidden = ctx.dhidden_TD.mul_(scale.to(ctx.dhidden_TD.dtype))
        if ctx.dweight_VD is not None:
            dweight = ctx.dweight_VD.mul_(scale).to(ctx.weight_dtype)
        ctx.dhidden_TD = ctx.dweight_VD = None  # one backward only; free the buffers with the graph
        return dhidden, dweight, None, None, None


def _check_inputs(hidden, weight, labels, ignore_index):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden must be (T, D) and weight (V, D) with the same D, "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"fused_linear_cross_entropy: labels must be (T={hidden.shape[0]},), got {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in TL_DTYPE_NAMES:
        raise ValueError(f"fused_linear_cross_entropy (triton): hidden and weight must share one dtype among "
                         f"fp16/bf16/fp32, got {hidden.dtype} and {weight.dtype}")
    V = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"fused_linear_cross_entropy: label {int(labels[pos])} at position {pos} is outside "
                         f"[0, {V}) and is not ignore_index={ignore_index}")


def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="sum", backend="auto"):
    """Cross-entropy of softmax(hidden @ weight.T) against labels (already shifted by the caller).

    hidden: (T, D); weight: (V, D) in nn.Linear layout; labels: (T,) int64 with ignore_index where no loss.
    reduction: "sum" (what global token normalization needs) or "mean" over non-ignored labels
    (all labels ignored: "sum" gives 0, "mean" gives nan like torch, with zero gradients).
    Returns a scalar fp32 tensor.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'sum' or 'mean', got {reduction!r}")
    which = pick_backend(backend, hidden, BACKENDS, op="fused_linear_cross_entropy")
    if which == "torch":
        return fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction)
    _check_inputs(hidden, weight, labels, ignore_index)
    return _FusedLinearCrossEntropy.apply(
        hidden.contiguous(), weight.contiguous(), labels.long().contiguous(), int(ignore_index), reduction
    )


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile check


def aot_specs() -> list[KernelSpec]:
    """Every (dtype, ROWS x BLOCK_V, COMPUTE_GRAD) the launcher can choose."""
    specs = []
    for t in TL_DTYPE_NAMES.values():
        sig = {"logits_ptr": f"*{t}", "labels_ptr": "*i64", "loss_ptr": "*fp32", "C": "i32", "V": "i32",
               "stride_row": "i32", "ignore_index": "i32", "ROWS": "constexpr", "BLOCK_V": "constexpr",
               "COMPUTE_GRAD": "constexpr"}
        for rows, block_v, warps in _CONFIGS:
            for grad in (True, False):
                specs.append(KernelSpec(f"ce_loss_grad {t} ROWS={rows} BLOCK_V={block_v} COMPUTE_GRAD={grad}",
                                        _ce_loss_grad_kernel, sig,
                                        {"ROWS": rows, "BLOCK_V": block_v, "COMPUTE_GRAD": grad}, warps, 1))
    return specs
