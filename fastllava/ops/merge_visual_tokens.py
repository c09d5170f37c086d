"""Text embeddings and image features merged into one (T, D) sequence in a single pass.

Shapes: T packed tokens, V vocabulary rows, D model width, S image feature rows (= placeholder count).
Suffix legend: ids_T, embed_VD, feats_SD, out_TD.

Triton path (backend="triton"):
  forward   slot_T = cumsum(ids_T == image_token_id) - 1 (torch), then ONE kernel reads each output row
            exactly once from its source: embed_VD[ids_T[t]] for text, feats_SD[slot_T[t]] for placeholders.
  backward  d feats_SD: row t of d out_TD goes to row slot_T[t] (each feature row has exactly one
            placeholder, so this is a plain gather, no conflicts);
            d embed_VD (only when embed_VD requires grad): text ids are stably sorted (placeholders get the
            key V, sorted last and skipped), and one program per run of equal ids sums its rows of
            d out_TD in fp32 in sorted (= position) order. No atomics: bit-identical across runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._aot import TL_DTYPE_NAMES, KernelSpec
from ._backend import new_output, pick_backend

BACKENDS = ("torch", "triton")


def _check_counts(input_ids, image_features, image_token_id):
    n_slots = int((input_ids == image_token_id).sum())
    if n_slots != image_features.shape[0]:
        raise ValueError(
            f"merge_visual_tokens: {n_slots} image placeholder positions (token id {image_token_id}) "
            f"but {image_features.shape[0]} image feature rows"
        )


def merge_visual_tokens_reference(input_ids, embed_weight, image_features, image_token_id):
    """input_ids (T,), embed_weight (V, D), image_features (n_images * tokens_per_image, D) -> (T, D)."""
    _check_counts(input_ids, image_features, image_token_id)
    is_image = input_ids == image_token_id
    text_ids = torch.where(is_image, torch.zeros_like(input_ids), input_ids)
    embeds = F.embedding(text_ids, embed_weight)
    if image_features.shape[0] == 0:
        return embeds
    return embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))


# ----------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _merge_fwd_kernel(
    # One program fills a (BLOCK_T, BLOCK_D) tile of out_TD, each element read once from its source.
    ids_ptr,  # ids_T int64: token ids, image_token_id at placeholders
    slot_ptr,  # slot_T int64: feature row of each placeholder (cumsum - 1), meaningless at text positions
    embed_ptr,  # embed_VD: embedding table
    feats_ptr,  # feats_SD: image features, embed_VD's dtype
    out_ptr,  # out out_TD, contiguous
    T,
    D,
    image_token_id,
    stride_embed,  # row stride of embed_VD
    stride_feats,  # row stride of feats_SD
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    d_ok = offs_d < D
    ids = tl.load(ids_ptr + offs_t, mask=t_ok, other=0)
    is_img = ids == image_token_id
    slot = tl.load(slot_ptr + offs_t, mask=t_ok & is_img, other=0)
    text_mask = (t_ok & ~is_img)[:, None] & d_ok[None, :]
    img_mask = (t_ok & is_img)[:, None] & d_ok[None, :]
    text = tl.load(embed_ptr + ids[:, None] * stride_embed + offs_d[None, :], mask=text_mask, other=0.0)
    img = tl.load(feats_ptr + slot[:, None] * stride_feats + offs_d[None, :], mask=img_mask, other=0.0)
    out = tl.where(is_img[:, None], img, text)
    out_offs = offs_t.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(out_ptr + out_offs, out, mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_bwd_feats_kernel(
    # One program copies the placeholder rows of a (BLOCK_T, BLOCK_D) tile of d out_TD to d feats_SD.
    ids_ptr,  # ids_T int64
    slot_ptr,  # slot_T int64
    dout_ptr,  # d out_TD
    dfeats_ptr,  # out d feats_SD, contiguous; every row is written exactly once
    T,
    D,
    image_token_id,
    stride_dout,  # row stride of d out_TD
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    ids = tl.load(ids_ptr + offs_t, mask=t_ok, other=0)
    is_img = t_ok & (ids == image_token_id)
    slot = tl.load(slot_ptr + offs_t, mask=is_img, other=0)
    mask = is_img[:, None] & (offs_d < D)[None, :]
    g = tl.load(dout_ptr + offs_t.to(tl.int64)[:, None] * stride_dout + offs_d[None, :], mask=mask)
    tl.store(dfeats_ptr + slot[:, None] * D + offs_d[None, :], g, mask=mask)


@triton.jit
def _embed_grad_kernel(
    # Program (i, j): if sorted position i starts a run of equal text ids, sum d out_TD over the run
    # (in sorted order, fp32) for columns block j and write the result to that id's row of d embed_VD.
    keys_ptr,  # keys_T int64: token ids stably sorted; placeholders carry V and sort last
    order_ptr,  # order_T int64: position in the pack of each sorted key
    run_end_ptr,  # run_end_T int64: one past the last sorted position holding the same key
    dout_ptr,  # d out_TD
    dembed_ptr,  # out d embed_VD, contiguous, zero-initialized (rows of absent ids stay 0)
    D,
    V,
    stride_dout,  # row stride of d out_TD
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    key = tl.load(keys_ptr + i)
    prev = tl.load(keys_ptr + i - 1, mask=i > 0, other=-1)
    if (key != prev) & (key < V):
        end = tl.load(run_end_ptr + i)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j in range(i, end):
            row = tl.load(order_ptr + j)
            acc += tl.load(dout_ptr + row * stride_dout + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        tl.store(dembed_ptr + key * D + offs_d, acc.to(dembed_ptr.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------------------------------
# Launchers

# Memory-bound copies: a (16, 256) tile = 4096 elements, 32 per thread with 4 warps, 16-byte vectors
# along D for 16-bit dtypes. Still to be tuned on a GPU (benchmarks/bench_merge.py reports GB/s).
_BLOCK_T, _BLOCK_D, _WARPS = 16, 256, 4
# The embedding gradient: one run of equal ids per program, 512 columns each (8 programs per row at D=4096).
_EMBED_BLOCK_D, _EMBED_WARPS = 512, 4


def _tile_grid(T, D):
    return (triton.cdiv(T, _BLOCK_T), triton.cdiv(D, _BLOCK_D))


def embed_grad_deterministic(ids_T, dout_TD, V, image_token_id):
    """d embed_VD (fp32 sums, stored in dout's dtype) of an embedding lookup, without atomics.

    ids_T: (T,) int64; dout_TD: (T, D); positions holding image_token_id contribute nothing.
    """
    T, D = dout_TD.shape
    keys = torch.where(ids_T == image_token_id, torch.full_like(ids_T, V), ids_T)
    keys_sorted, order = torch.sort(keys, stable=True)
    run_end = torch.searchsorted(keys_sorted, keys_sorted, right=True)
    dembed_VD = torch.zeros((V, D), dtype=dout_TD.dtype, device=dout_TD.device)
    if T > 0:
        _embed_grad_kernel[(T, triton.cdiv(D, _EMBED_BLOCK_D))](
            keys_sorted, order, run_end, dout_TD, dembed_VD, D, V, dout_TD.stride(0),
            BLOCK_D=_EMBED_BLOCK_D, num_warps=_EMBED_WARPS,
        )
    return dembed_VD


class _MergeVisualTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids_T, embed_VD, feats_SD, image_token_id):
        T, D = ids_T.shape[0], embed_VD.shape[1]
        slot_T = torch.cumsum(ids_T == image_token_id, 0) - 1
        out_TD = new_output((T, D), embed_VD.dtype, embed_VD.device)
        if T > 0:
            _merge_fwd_kernel[_tile_grid(T, D)](
                ids_T, slot_T, embed_VD, feats_SD, out_TD, T, D, image_token_id,
                embed_VD.stride(0), feats_SD.stride(0), BLOCK_T=_BLOCK_T, BLOCK_D=_BLOCK_D, num_warps=_WARPS,
            )
        ctx.save_for_backward(ids_T, slot_T)
        ctx.image_token_id = image_token_id
        ctx.n_feats = feats_SD.shape[0]
        ctx.vocab = embed_VD.shape[0]
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        ids_T, slot_T = ctx.saved_tensors
        T, D = dout_TD.shape
        dout_TD = dout_TD if dout_TD.stride(1) == 1 else dout_TD.contiguous()
        dembed = dfeats = None
        if ctx.needs_input_grad[2]:
            dfeats = new_output((ctx.n_feats, D), dout_TD.dtype, dout_TD.device)
            if T > 0:
                _merge_bwd_feats_kernel[_tile_grid(T, D)](
                    ids_T, slot_T, dout_TD, dfeats, T, D, ctx.image_token_id, dout_TD.stride(0),
                    BLOCK_T=_BLOCK_T, BLOCK_D=_BLOCK_D, num_warps=_WARPS,
                )
        if ctx.needs_input_grad[1]:
            dembed = embed_grad_deterministic(ids_T, dout_TD, ctx.vocab, ctx.image_token_id)
        return None, dembed, dfeats, None


def _check_inputs(input_ids, embed_weight, image_features, image_token_id):
    if input_ids.dim() != 1 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"merge_visual_tokens: input_ids must be (T,) int64, got {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}")
    if embed_weight.dim() != 2 or embed_weight.dtype not in TL_DTYPE_NAMES:
        raise ValueError(f"merge_visual_tokens (triton): embed_weight must be (V, D) fp16/bf16/fp32, got "
                         f"{tuple(embed_weight.shape)} {embed_weight.dtype}")
    if image_features.dim() != 2 or image_features.shape[1] != embed_weight.shape[1]:
        raise ValueError(f"merge_visual_tokens: image_features must be (S, D={embed_weight.shape[1]}), got "
                         f"{tuple(image_features.shape)}")
    _check_counts(input_ids, image_features, image_token_id)
    V = embed_weight.shape[0]
    bad = ((input_ids < 0) | (input_ids >= V)) & (input_ids != image_token_id)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"merge_visual_tokens: text token id {int(input_ids[pos])} at position {pos} is outside "
                         f"the embedding table's {V} rows")


def merge_visual_tokens(input_ids, embed_weight, image_features, image_token_id, *, backend="auto"):
    """Gather text rows of embed_weight and place image_features, in order, at the placeholder positions.

    input_ids: (T,) int64; embed_weight: (V, D); image_features: (n_images * tokens_per_image, D);
    the number of positions equal to image_token_id must equal the number of feature rows.
    Returns (T, D) in embed_weight's dtype. Differentiable in embed_weight and image_features; the
    embedding gradient of the Triton path is deterministic (no atomics).
    """
    which = pick_backend(backend, embed_weight, BACKENDS, op="merge_visual_tokens")
    if which == "torch":
        return merge_visual_tokens_reference(input_ids, embed_weight, image_features, image_token_id)
    _check_inputs(input_ids, embed_weight, image_features, image_token_id)
    feats = image_features.to(embed_weight.dtype)
    embed = embed_weight if embed_weight.stride(1) == 1 else embed_weight.contiguous()
    feats = feats if feats.stride(1) == 1 else feats.contiguous()
    return _MergeVisualTokens.apply(input_ids.long().contiguous(), embed, feats, int(image_token_id))


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile check


def aot_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, config) the launchers above can choose."""
    specs = []
    tile = {"BLOCK_T": _BLOCK_T, "BLOCK_D": _BLOCK_D}
    for t in TL_DTYPE_NAMES.values():
        fwd_sig = {"ids_ptr": "*i64", "slot_ptr": "*i64", "embed_ptr": f"*{t}", "feats_ptr": f"*{t}",
                   "out_ptr": f"*{t}", "T": "i32", "D": "i32", "image_token_id": "i32", "stride_embed": "i32",
                   "stride_feats": "i32", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
        specs.append(KernelSpec(f"merge_fwd {t} {_BLOCK_T}x{_BLOCK_D}", _merge_fwd_kernel, fwd_sig, tile, _WARPS, 1))
        bwd_sig = {"ids_ptr": "*i64", "slot_ptr": "*i64", "dout_ptr": f"*{t}", "dfeats_ptr": f"*{t}", "T": "i32",
                   "D": "i32", "image_token_id": "i32", "stride_dout": "i32", "BLOCK_T": "constexpr",
                   "BLOCK_D": "constexpr"}
        specs.append(KernelSpec(f"merge_bwd_feats {t} {_BLOCK_T}x{_BLOCK_D}", _merge_bwd_feats_kernel, bwd_sig, tile,
                                _WARPS, 1))
        emb_sig = {"keys_ptr": "*i64", "order_ptr": "*i64", "run_end_ptr": "*i64", "dout_ptr": f"*{t}",
                   "dembed_ptr": f"*{t}", "D": "i32", "V": "i32", "stride_dout": "i32", "BLOCK_D": "constexpr"}
        specs.append(KernelSpec(f"embed_grad {t} BLOCK_D={_EMBED_BLOCK_D}", _embed_grad_kernel, emb_sig,
                                {"BLOCK_D": _EMBED_BLOCK_D}, _EMBED_WARPS, 1))
    return specs
