"""Visual-token merge microbenchmarks (pytest-benchmark): ours against eager PyTorch and torch.compile.

    python -m pytest benchmarks/bench_merge.py --benchmark-only

GPU: a 16K-token pack, D=4096, V=32000, 8 images x 576 placeholders, bf16. CPU: 512 tokens, D=64,
V=1000, 2 images x 32 placeholders, fp32, eager only (triton and compile are timed on CUDA). Embedding
table and image features both trained (stage 2).
Providers: triton (ours), eager (merge_visual_tokens_reference), compile (torch.compile of that
reference; it graph-breaks at the reference's placeholder count check, a host sync).
Modes: fwd, fwd+bwd (backward of a random output gradient).
Bytes (extra_info["bytes"]), what the work must move at the least: forward, every output row read once
from its source and written once (2 T D elements) plus ids and slots (16 B per token); the backward
adds the image rows (read and write S D), the text rows for the embedding gradient (read (T - S) D),
the gradient table (write V D: zeros, then the touched rows) and the sort of the ids (24 B per token).
"""

from __future__ import annotations

import pytest
import torch

from fastllava.ops.merge_visual_tokens import merge_visual_tokens, merge_visual_tokens_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# name -> (T, V, D, images, tokens per image)
SHAPES = {"16k-4096": (16384, 32000, 4096, 8, 576)} if CUDA else {"tiny": (512, 1000, 64, 2, 32)}
PROVIDERS = ("triton", "eager", "compile")
MODES = ("fwd", "fwd+bwd")


def setup(T, V, D, n_images, tokens_per_image, dtype=DTYPE, device=DEVICE):
    """ids (T,) with n_images runs of placeholders (id V - 1, the <image> token added last to the
    vocabulary), embed (V, D), feats (S, D) both trained, dout (T, D) random, image_token_id."""
    image_token_id = V - 1
    g = torch.Generator(device).manual_seed(0)
    ids = torch.randint(0, V - 1, (T,), device=device, generator=g)
    for s in torch.linspace(0, T - tokens_per_image, n_images).long().tolist():
        ids[s : s + tokens_per_image] = image_token_id
    S = n_images * tokens_per_image
    embed = torch.randn(V, D, device=device, generator=g).to(dtype).requires_grad_()
    feats = torch.randn(S, D, device=device, generator=g).to(dtype).requires_grad_()
    dout = torch.randn(T, D, device=device, generator=g).to(dtype)
    return ids, embed, feats, dout, image_token_id


def merge_bytes(T, V, D, S, element_size, mode):
    fwd = 2 * T * D * element_size + 16 * T
    return fwd if mode == "fwd" else fwd + (2 * S * D + (T - S) * D + V * D) * element_size + 24 * T


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_merge(measure, provider_fn, shape, provider, mode):
    op = provider_fn(provider, merge_visual_tokens, merge_visual_tokens_reference)
    T, V, D, n_images, per_image = SHAPES[shape]
    ids, embed, feats, dout, img = setup(T, V, D, n_images, per_image)
    assert int((ids == img).sum()) == feats.shape[0]  # the image runs do not overlap

    def forward():
        return op(ids, embed, feats, img)
    fn = forward if mode == "fwd" else (lambda: torch.autograd.backward(forward(), dout))
    S = feats.shape[0]
    measure(fn, group=f"merge {shape} {mode}", bytes_moved=merge_bytes(T, V, D, S, embed.element_size(), mode),
            grads_of=(embed, feats), tokens=T, vocab=V, dim=D, image_rows=S, dtype=str(DTYPE).split(".")[-1])
