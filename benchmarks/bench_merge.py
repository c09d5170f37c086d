"""One-pass visual-token merge vs eager PyTorch and torch.compile: speed, GB/s, % of peak bandwidth.

    python benchmarks/bench_merge.py

Shape: a 16K-token pack, D=4096, V=32000, 8 images x 576 placeholders, bf16, embedding table and
image features both trained (stage 2). Bytes moved by the forward: every output row read once from
its source and written once (2*T*D elements) plus ids and slots (16 B per token); backward: the image
rows (read + write S*D) and the text rows for the embedding gradient (read (T-S)*D, write V*D: zeros
then the touched rows).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import compiled, forward_and_full, measure, print_table, require_gpu  # noqa: E402

def setup(T=16384, V=32000, D=4096, n_images=8, tokens_per_image=576, dtype=torch.bfloat16, device="cuda"):
    """ids (T,) with n_images runs of placeholders (id V - 1, the <image> token added last to the vocabulary),
    embed (V, D), feats (S, D), dout (T, D), image_token_id."""
    image_token_id = V - 1
    g = torch.Generator(device).manual_seed(0)
    ids = torch.randint(0, V - 1, (T,), device=device, generator=g)
    starts = torch.linspace(0, T - tokens_per_image, n_images, device=device).long()
    for s in starts.tolist():
        ids[s : s + tokens_per_image] = image_token_id
    S = int((ids == image_token_id).sum())
    embed = torch.randn(V, D, device=device, generator=g).to(dtype).requires_grad_()
    feats = torch.randn(S, D, device=device, generator=g).to(dtype).requires_grad_()
    dout = torch.randn(T, D, device=device, generator=g).to(dtype)
    return ids, embed, feats, dout, image_token_id


def main():
    require_gpu("bench_merge")
    from fastllava.ops.merge_visual_tokens import merge_visual_tokens, merge_visual_tokens_reference

    ids, embed, feats, dout, img = setup()
    T, D = dout.shape
    S, V = feats.shape[0], embed.shape[0]
    el = embed.element_size()
    bytes_fwd = 2 * T * D * el + 16 * T
    bytes_full = bytes_fwd + 2 * S * D * el + (T - S) * D * el + V * D * el + 24 * T
    eager_compiled = compiled(merge_visual_tokens_reference)
    providers = {
        "eager": lambda: merge_visual_tokens_reference(ids, embed, feats, img),
        "torch.compile": lambda: eager_compiled(ids, embed, feats, img),
        "triton": lambda: merge_visual_tokens(ids, embed, feats, img, backend="triton"),
    }
    rows = []
    for name, fwd in providers.items():
        fwd_fn, full_fn = forward_and_full(fwd, lambda y: (y * dout).sum(), [embed, feats])
        rows.append(measure(name, fwd_fn, full_fn, bytes_fwd=bytes_fwd, bytes_full=bytes_full))
    print_table(f"merge T={T} D={D} V={V} S={S} bf16 (full includes the (y * dout).sum() driver)", rows)


if __name__ == "__main__":
    main()
