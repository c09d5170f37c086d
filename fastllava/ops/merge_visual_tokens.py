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
Torch path (backend="torch"): the same gather with torch ops (F.embedding, index_select at slot_T, where);
its backward is the embedding's own and a gather of d out_TD at each feature row's position.
Both run as the custom op fastllava::merge_visual_tokens; neither reads a value on the host (the
reference's masked_scatter does, in its count check and its backward's masked_select).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._aot import TL_DTYPE_NAMES, KernelSpec
from ._backend import new_output, pick_backend
from ._library import custom_op, no_tensor, or_none

BACKENDS = ("torch", "triton")


def _check_counts(input_ids, n_feats, image_token_id):
    """Host-side count check (the reference and the Triton interpreter: reads values)."""
    n_slots = int((input_ids == image_token_id).sum())
    if n_slots != n_feats:
        raise ValueError(
            f"merge_visual_tokens: {n_slots} image placeholder positions (token id {image_token_id}) "
            f"but {n_feats} image feature rows"
        )


def merge_visual_tokens_reference(input_ids, embed_weight, image_features, image_token_id):
    """input_ids (T,), embed_weight (V, D), image_features (n_images * tokens_per_image, D) -> (T, D).

    The tests' oracle (and the benchmarks' eager baseline): masked_scatter reads values on the host (its
    count check, its backward's masked_select), so the torch backend does not run it (_torch_forward)."""
    _check_counts(input_ids, image_features.shape[0], image_token_id)
    is_image = input_ids == image_token_id
    text_ids = torch.where(is_image, torch.zeros_like(input_ids), input_ids)
    embeds = F.embedding(text_ids, embed_weight)
    if image_features.shape[0] == 0:
        return embeds
    return embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))


# ----------------------------------------------------------------------------------------------------
# Kernels
#
# The token count, the placeholder id and the vocabulary only bound rows or compare ids, so the JIT is told
# not to specialize them (do_not_specialize): a launch then differs from the compile check's specs only by
# whether the width D (and the row strides, which equal it) is a multiple of 16, which decides how the
# loads along D vectorize; aot_specs() compiles both.


@triton.jit(do_not_specialize=["T", "image_token_id"])
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


@triton.jit(do_not_specialize=["T", "image_token_id"])
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


@triton.jit(do_not_specialize=["V"])
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
# Written out at every launch: left out, Triton launches with its default (3 stages on NVIDIA GPUs), which is
# not what aot_specs() compiles and checks (found by tests/ops/test_new_shapes.py).
_NUM_STAGES = 1


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
            BLOCK_D=_EMBED_BLOCK_D, num_warps=_EMBED_WARPS, num_stages=_NUM_STAGES,
        )
    return dembed_VD


def _slots(ids_T, image_token_id):
    """(T,) int64: the feature row of each placeholder (cumsum - 1), meaningless at text positions."""
    return torch.cumsum(ids_T == image_token_id, 0) - 1


def _triton_forward(ids_T, embed_VD, feats_SD, image_token_id):
    T, D = ids_T.shape[0], embed_VD.shape[1]
    out_TD = new_output((T, D), embed_VD.dtype, embed_VD.device)
    if T > 0:
        _merge_fwd_kernel[_tile_grid(T, D)](
            ids_T, _slots(ids_T, image_token_id), embed_VD, feats_SD, out_TD, T, D, image_token_id,
            embed_VD.stride(0), feats_SD.stride(0), BLOCK_T=_BLOCK_T, BLOCK_D=_BLOCK_D, num_warps=_WARPS,
            num_stages=_NUM_STAGES,
        )
    return out_TD


def _triton_backward(dout_TD, ids_T, n_feats, vocab, image_token_id, need_embed, need_feats):
    T, D = dout_TD.shape
    dout_TD = dout_TD if dout_TD.stride(1) == 1 else dout_TD.contiguous()
    dembed = dfeats = None
    if need_feats:
        dfeats = new_output((n_feats, D), dout_TD.dtype, dout_TD.device)
        if T > 0:
            _merge_bwd_feats_kernel[_tile_grid(T, D)](
                ids_T, _slots(ids_T, image_token_id), dout_TD, dfeats, T, D, image_token_id, dout_TD.stride(0),
                BLOCK_T=_BLOCK_T, BLOCK_D=_BLOCK_D, num_warps=_WARPS, num_stages=_NUM_STAGES,
            )
    if need_embed:
        dembed = embed_grad_deterministic(ids_T, dout_TD, vocab, image_token_id)
    return dembed, dfeats


def _torch_forward(ids_T, embed_VD, feats_SD, image_token_id):
    """The reference's values (embedding rows, feature rows in order at the placeholders) without its
    masked_scatter, whose count check and backward (masked_select) read values on the host: each
    placeholder gathers feature row slot_T[t]."""
    is_image = ids_T == image_token_id
    embeds_TD = F.embedding(torch.where(is_image, 0, ids_T), embed_VD)
    S = feats_SD.shape[0]
    if S == 0:
        return embeds_TD
    slot_T = _slots(ids_T, image_token_id).clamp(0, S - 1)  # text rows gather row 0, then drop it
    return torch.where(is_image[:, None], feats_SD.index_select(0, slot_T), embeds_TD)


def _torch_backward(dout_TD, ids_T, n_feats, vocab, image_token_id, need_embed, need_feats):
    """What autograd computes for the reference, without masked_select: d embed_VD by the embedding's
    own backward over the text rows; d feats_SD[s] = d out_TD[position of placeholder s], a gather whose
    positions come from one scatter of T indices (text rows write a spare slot that is dropped)."""
    is_image = ids_T == image_token_id
    dembed = dfeats = None
    if need_embed:
        text_ids = torch.where(is_image, 0, ids_T)
        dembed = torch.ops.aten.embedding_dense_backward(dout_TD.masked_fill(is_image[:, None], 0), text_ids,
                                                         vocab, -1, False)
    if need_feats:
        target_T = torch.where(is_image, _slots(ids_T, image_token_id), n_feats)
        rows_T = torch.arange(ids_T.shape[0], device=ids_T.device)
        pos_S = torch.zeros(n_feats + 1, dtype=torch.long, device=ids_T.device).scatter_(0, target_T, rows_T)
        dfeats = dout_TD.index_select(0, pos_S[:n_feats])
    return dembed, dfeats


def _check_values(ids_T, n_feats, vocab, image_token_id, backend):
    """Placeholder count and, for Triton (which gathers rows unchecked), token ids. The Triton
    interpreter (CPU) reads values on the host anyway: ValueError. Elsewhere torch._assert_async: no host
    sync (the torch path's F.embedding checks the ids itself). A PackedBatch holds n_images x
    num_image_tokens placeholders by construction (PackedBatch.from_samples checks the images)."""
    if backend == "triton" and not ids_T.is_cuda:
        _check_counts(ids_T, n_feats, image_token_id)
        bad = ((ids_T < 0) | (ids_T >= vocab)) & (ids_T != image_token_id)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise ValueError(f"merge_visual_tokens: text token id {int(ids_T[pos])} at position {pos} is outside "
                             f"the embedding table's {vocab} rows")
        return
    torch._assert_async((ids_T == image_token_id).sum() == n_feats,
                        f"merge_visual_tokens: image placeholder positions (token id {image_token_id}) must match "
                        f"the {n_feats} image feature rows")
    if backend == "triton":
        bad = ((ids_T < 0) | (ids_T >= vocab)) & (ids_T != image_token_id)
        torch._assert_async(~bad.any(), f"merge_visual_tokens: a text token id is outside the embedding table's "
                                        f"{vocab} rows")


@custom_op("merge_visual_tokens")
def _merge_op(input_ids: torch.Tensor, embed_weight: torch.Tensor, image_features: torch.Tensor,
              image_token_id: int, backend: str) -> torch.Tensor:
    """(T, D) merged embeddings; image_features already in embed_weight's dtype."""
    _check_values(input_ids, image_features.shape[0], embed_weight.shape[0], image_token_id, backend)
    fn = _triton_forward if backend == "triton" else _torch_forward
    return fn(input_ids, embed_weight, image_features, image_token_id)


@_merge_op.register_fake
def _(input_ids, embed_weight, image_features, image_token_id, backend):
    return embed_weight.new_empty((input_ids.shape[0], embed_weight.shape[1]))


@custom_op("merge_visual_tokens_backward")
def _merge_backward_op(dout: torch.Tensor, input_ids: torch.Tensor, num_features: int, vocab: int,
                       image_token_id: int, need_embed: bool, need_feats: bool, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d embed_weight (V, D), d image_features (S, D)), each (0,) when not wanted."""
    fn = _triton_backward if backend == "triton" else _torch_backward
    dembed, dfeats = fn(dout, input_ids, num_features, vocab, image_token_id, need_embed, need_feats)
    return (dembed if need_embed else no_tensor(dout)), (dfeats if need_feats else no_tensor(dout))


@_merge_backward_op.register_fake
def _(dout, input_ids, num_features, vocab, image_token_id, need_embed, need_feats, backend):
    D = dout.shape[1]
    return (dout.new_empty((vocab, D)) if need_embed else no_tensor(dout),
            dout.new_empty((num_features, D)) if need_feats else no_tensor(dout))


def _setup_context(ctx, inputs, output):
    input_ids, embed_weight, image_features, image_token_id, backend = inputs
    ctx.save_for_backward(input_ids)
    ctx.args = (image_features.shape[0], embed_weight.shape[0], image_token_id)
    ctx.backend = backend


def _backward(ctx, dout):
    (input_ids,) = ctx.saved_tensors
    need_embed, need_feats = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dembed, dfeats = torch.ops.fastllava.merge_visual_tokens_backward(dout, input_ids, *ctx.args, need_embed,
                                                                       need_feats, ctx.backend)
    return None, or_none(dembed, need_embed), or_none(dfeats, need_feats), None, None


_merge_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(input_ids, embed_weight, image_features, backend):
    """Metadata only: runs on fake tensors and under torch.compile; values are checked inside the op."""
    if input_ids.dim() != 1 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"merge_visual_tokens: input_ids must be (T,) int64, got {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}")
    if backend == "triton" and (embed_weight.dim() != 2 or embed_weight.dtype not in TL_DTYPE_NAMES):
        raise ValueError(f"merge_visual_tokens (triton): embed_weight must be (V, D) fp16/bf16/fp32, got "
                         f"{tuple(embed_weight.shape)} {embed_weight.dtype}")
    if embed_weight.dim() != 2:
        raise ValueError(f"merge_visual_tokens: embed_weight must be (V, D), got {tuple(embed_weight.shape)}")
    if image_features.dim() != 2 or image_features.shape[1] != embed_weight.shape[1]:
        raise ValueError(f"merge_visual_tokens: image_features must be (S, D={embed_weight.shape[1]}), got "
                         f"{tuple(image_features.shape)}")


def merge_visual_tokens(input_ids, embed_weight, image_features, image_token_id, *, backend="auto"):
    """Gather text rows of embed_weight and place image_features, in order, at the placeholder positions.

    input_ids: (T,) int64; embed_weight: (V, D); image_features: (n_images * tokens_per_image, D);
    the number of positions equal to image_token_id must equal the number of feature rows.
    Returns (T, D) in embed_weight's dtype. Differentiable in embed_weight and image_features; the
    embedding gradient of the Triton path is deterministic (no atomics).
    Runs as the custom op torch.ops.fastllava.merge_visual_tokens (fake implementation, registered
    backward; see docs/kernels.md), both backends; neither reads a value on the host outside the Triton
    interpreter (the count is checked with torch._assert_async).
    """
    which = pick_backend(backend, embed_weight, BACKENDS, op="merge_visual_tokens")
    _check_inputs(input_ids, embed_weight, image_features, which)
    feats = image_features.to(embed_weight.dtype)
    if which == "triton":
        input_ids = input_ids.long().contiguous()
        embed_weight = embed_weight if embed_weight.stride(1) == 1 else embed_weight.contiguous()
        feats = feats if feats.stride(1) == 1 else feats.contiguous()
    return torch.ops.fastllava.merge_visual_tokens(input_ids, embed_weight, feats, int(image_token_id), which)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile check


def _markings(sig):
    """(name suffix, divisible_by_16) for a width that is a multiple of 16 (every released model's) and one
    that is not: D and the row strides (equal to D) marked or not; pointers always."""
    pointers = tuple(n for n, t in sig.items() if t.startswith("*"))
    widths = tuple(n for n in sig if n == "D" or n.startswith("stride"))
    return [("", pointers), (" D%16=0", pointers + widths)]


def aot_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, config, width marking) the launchers above can produce."""
    specs = []
    tile = {"BLOCK_T": _BLOCK_T, "BLOCK_D": _BLOCK_D}
    for t in TL_DTYPE_NAMES.values():
        fwd_sig = {"ids_ptr": "*i64", "slot_ptr": "*i64", "embed_ptr": f"*{t}", "feats_ptr": f"*{t}",
                   "out_ptr": f"*{t}", "T": "i32", "D": "i32", "image_token_id": "i32", "stride_embed": "i32",
                   "stride_feats": "i32", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
        bwd_sig = {"ids_ptr": "*i64", "slot_ptr": "*i64", "dout_ptr": f"*{t}", "dfeats_ptr": f"*{t}", "T": "i32",
                   "D": "i32", "image_token_id": "i32", "stride_dout": "i32", "BLOCK_T": "constexpr",
                   "BLOCK_D": "constexpr"}
        emb_sig = {"keys_ptr": "*i64", "order_ptr": "*i64", "run_end_ptr": "*i64", "dout_ptr": f"*{t}",
                   "dembed_ptr": f"*{t}", "D": "i32", "V": "i32", "stride_dout": "i32", "BLOCK_D": "constexpr"}
        for name, fn, sig, consts, warps in (
            (f"merge_fwd {t} {_BLOCK_T}x{_BLOCK_D}", _merge_fwd_kernel, fwd_sig, tile, _WARPS),
            (f"merge_bwd_feats {t} {_BLOCK_T}x{_BLOCK_D}", _merge_bwd_feats_kernel, bwd_sig, tile, _WARPS),
            (f"embed_grad {t} BLOCK_D={_EMBED_BLOCK_D}", _embed_grad_kernel, emb_sig, {"BLOCK_D": _EMBED_BLOCK_D},
             _EMBED_WARPS),
        ):
            for label, marked in _markings(sig):
                specs.append(KernelSpec(name + label, fn, sig, consts, warps, _NUM_STAGES, marked))
    return specs
