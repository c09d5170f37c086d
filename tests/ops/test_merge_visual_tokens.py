"""merge_visual_tokens, Triton path (interpreter on CPU) against the torch reference and float64.

The forward and the image-feature gradient are pure copies: bit-exact. The embedding gradient is a
sum; it follows the tolerance rule of tests/ops/tolerance.py (our error vs float64 <= 2x torch's own
error in the same dtype, plus one ulp of the largest value) and must be bit-identical between runs.
"""

import importlib

import pytest
import torch
from tolerance import DEVICE, assert_within_rule

from fastllava.ops import merge_visual_tokens
from fastllava.ops.merge_visual_tokens import merge_visual_tokens_reference

merge_mod = importlib.import_module("fastllava.ops.merge_visual_tokens")

IMG = 7  # placeholder id inside the vocabulary, like LLaVA's <image> token added to the tokenizer


def make_pack(T=97, V=50, D=80, dtype=torch.float32, seed=0, image_spans=((10, 30), (60, 71))):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (T,), generator=g)
    ids[ids == IMG] = 3  # repeated text ids on purpose: many rows share an embedding row
    for a, b in image_spans:
        ids[a:b] = IMG
    S = int((ids == IMG).sum())
    embed = torch.randn(V, D, generator=g, dtype=torch.float64).to(dtype)
    feats = torch.randn(S, D, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)
    return ids.to(DEVICE), embed.to(DEVICE), feats.to(DEVICE), dout.to(DEVICE)


def run(fn, ids, embed, feats, dout, embed_grad=True, feats_grad=True):
    e = embed.detach().clone().requires_grad_(embed_grad)
    f = feats.detach().clone().requires_grad_(feats_grad)
    out = fn(ids, e, f, IMG)
    out.backward(dout.to(out.dtype))
    return out.detach(), e.grad, f.grad


def triton_merge(ids, e, f, img):
    return merge_visual_tokens(ids, e, f, img, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_and_float64(dtype):
    ids, embed, feats, dout = make_pack(dtype=dtype)
    out, d_embed, d_feats = run(triton_merge, ids, embed, feats, dout)
    ref_out, ref_embed, ref_feats = run(merge_visual_tokens_reference, ids, embed, feats, dout)
    assert torch.equal(out, ref_out)
    assert torch.equal(d_feats, ref_feats)
    _, r64_embed, _ = run(merge_visual_tokens_reference, ids, embed.double(), feats.double(), dout.double())
    assert_within_rule(d_embed, ref_embed, r64_embed, "grad embed")
    # rows of ids that never occur as text (the placeholder id among them) get exactly zero
    absent = torch.ones(embed.shape[0], dtype=torch.bool, device=DEVICE)
    absent[ids[ids != IMG]] = False
    assert absent[IMG] and (d_embed[absent] == 0).all()


def test_embedding_gradient_is_deterministic_with_repeated_ids():
    # 400 positions over 5 text ids: long runs of equal ids, summed in a fixed order every time
    ids, embed, feats, dout = make_pack(T=400, V=6, D=80, image_spans=((5, 40), (200, 260)))
    first = run(triton_merge, ids, embed, feats, dout)[1]
    second = run(triton_merge, ids, embed, feats, dout)[1]
    assert torch.equal(first, second)
    torch_same = run(merge_visual_tokens_reference, ids, embed, feats, dout)[1]
    ref = run(merge_visual_tokens_reference, ids, embed.double(), feats.double(), dout.double())[1]
    assert_within_rule(first, torch_same, ref, "grad embed")


def test_poisoned_outputs_are_all_written(monkeypatch):
    monkeypatch.setenv("FASTLLAVA_POISON_OUTPUTS", "1")
    ids, embed, feats, dout = make_pack()
    out, _, d_feats = run(triton_merge, ids, embed, feats, dout)
    assert torch.isfinite(out).all() and torch.isfinite(d_feats).all()


def test_frozen_embedding_casts_and_no_images():
    ids, embed, feats, dout = make_pack(dtype=torch.float16)
    # fp32 features into an fp16 table, the table frozen (stage 1): only the features get a gradient
    out, d_embed, d_feats = run(triton_merge, ids, embed, feats.float(), dout, embed_grad=False)
    ref_out, _, ref_feats = run(merge_visual_tokens_reference, ids, embed, feats.float(), dout, embed_grad=False)
    assert d_embed is None and d_feats.dtype == torch.float32
    assert torch.equal(out, ref_out) and torch.equal(d_feats, ref_feats)
    # a text-only pack
    ids, embed, feats, dout = make_pack(image_spans=())
    assert feats.shape[0] == 0
    out, d_embed, _ = run(triton_merge, ids, embed, feats, dout)
    ref_out, ref_embed, _ = run(merge_visual_tokens_reference, ids, embed, feats, dout)
    _, r64_embed, _ = run(merge_visual_tokens_reference, ids, embed.double(), feats.double(), dout.double())
    assert torch.equal(out, ref_out)
    assert_within_rule(d_embed, ref_embed, r64_embed, "grad embed, text-only pack")


def test_placeholder_id_outside_the_vocabulary():
    ids, embed, feats, dout = make_pack()
    ids = torch.where(ids == IMG, torch.full_like(ids, -200), ids)  # original LLaVA's IMAGE_TOKEN_INDEX
    out = merge_visual_tokens(ids, embed, feats, -200, backend="triton")
    assert torch.equal(out, merge_visual_tokens_reference(ids, embed, feats, -200))


def test_errors_name_both_counts_and_bad_ids():
    ids, embed, feats, _ = make_pack()
    n = int((ids == IMG).sum())
    with pytest.raises(ValueError, match=f"{n} image placeholder positions .* but {n - 1} image feature rows"):
        merge_visual_tokens(ids, embed, feats[1:], IMG, backend="triton")
    bad = ids.clone()
    bad[4] = 50
    with pytest.raises(ValueError, match="text token id 50 at position 4 is outside the embedding table's 50 rows"):
        merge_visual_tokens(bad, embed, feats, IMG, backend="triton")
    with pytest.raises(ValueError, match=r"image_features must be \(S, D=80\)"):
        merge_visual_tokens(ids, embed, feats[:, :5], IMG, backend="triton")


def test_aot_specs_match_kernel_arguments():
    specs = merge_mod.aot_specs()
    assert {s.fn for s in specs} == {merge_mod._merge_fwd_kernel, merge_mod._merge_bwd_feats_kernel,
                                     merge_mod._embed_grad_kernel}
    assert len(specs) == 18  # 3 kernels x fp16/bf16/fp32 x D a multiple of 16 or not
    for spec in specs:
        assert list(spec.signature) == spec.fn.arg_names, spec.name
        assert set(spec.constexprs) == {n for n, t in spec.signature.items() if t == "constexpr"}, spec.name
