"""CLIP-style contrastive pretraining of a vision tower that starts from random weights.

LLaVA never trains its vision tower from nothing: it takes OpenAI's CLIP, trained contrastively to
match images with their captions, and keeps it frozen. The demo, where nothing can be downloaded, needs a
stand-in (demo/components.py writes it as a CLIP directory), and the LLM's answer loss is a poor one: it shapes the
tower only toward what the decoder already reads, so salient attributes (colour, count) crowd out
subtler ones (shape), which stayed at chance for 700+ steps (docs/demo.md, "Tuning notes"). A few
hundred contrastive steps on the captions give every attribute a caption names its own direction.

The recipe is CLIP's, scaled down: the image side is the mean of the tower's selected-layer patch
features (what LLaVA reads), linearly projected; the text side is the mean of the caption's token
embeddings plus the mean of its bigram embeddings (a bag of words alone cannot tell "top left and bottom
right" from "top right and bottom left", and a tower trained on it confused left and right: position
85.9% held-out, every error a left/right swap); both L2-normalized, a learnable temperature
(initialized to 1/0.07, capped at 100) and the symmetric cross-entropy over the batch. Captions that
repeat inside a batch are all positives of one another (a small synthetic set repeats captions).

The images are decoded once and held in memory as fp16: this is for the small image sets of a demo
or a test, not a CLIP trainer for LAION.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..progress import progress

MAX_IMAGE_BYTES = 8 << 30  # the decoded fp16 images held in memory; beyond this, this is the wrong tool


@dataclass
class CaptionedImages:
    """Decoded images and their tokenized captions, held in memory for contrastive pretraining."""

    pixels: torch.Tensor  # (N, 3, S, S) fp16, preprocessed as LLaVA's data pipeline does
    token_ids: list[torch.Tensor]  # caption of image i, tokenized (no special tokens)
    caption_ids: torch.Tensor  # (N,) int64: equal ids <=> identical captions
    skipped_text_only: int


def load_captioned_images(data_path: str, image_folder: str, tokenizer, *, image_mode: str,
                          image_size: int) -> CaptionedImages:
    """Image-caption pairs from a LLaVA-format file (LCS-558K style: the gpt turns are the caption)."""
    from ..data.files import image_list, load_records
    from ..data.images import load_images

    if image_folder is None:
        raise ValueError(f"contrastive pretraining on {data_path}: no image folder to read its images from "
                         f"(set data.image_folder)")
    records = load_records(data_path, verbose=False)
    paths, captions, skipped = [], [], 0
    for i in range(len(records)):
        entry = records[i]
        images = image_list(entry)
        if not images:
            skipped += 1
            continue
        if len(images) != 1:
            raise ValueError(f"{data_path}: sample {records.ids[i]!r} has {len(images)} images; contrastive "
                             f"pretraining pairs one image with one caption")
        caption = " ".join(t["value"] for t in entry["conversations"] if t["from"] == "gpt").strip()
        if not caption:
            raise ValueError(f"{data_path}: sample {records.ids[i]!r} has an image but no gpt turn to use as caption")
        paths.append(os.path.join(image_folder, images[0]))
        captions.append(caption)
    if not paths:
        raise ValueError(f"{data_path}: no sample with an image, nothing to pretrain the vision tower on")
    need = len(paths) * 3 * image_size * image_size * 2
    if need > MAX_IMAGE_BYTES:
        raise ValueError(f"{data_path}: {len(paths):,} images at {image_size}px need {need / 2**30:.1f} GiB in memory "
                         f"(limit {MAX_IMAGE_BYTES / 2**30:.0f} GiB); contrastive pretraining is for small image sets")
    pixels = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.float16)
    chunk = 512
    for start in range(0, len(paths), chunk):
        pixels[start:start + chunk] = load_images(paths[start:start + chunk], mode=image_mode, size=image_size)
    ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    index: dict[str, int] = {}
    caption_ids = torch.tensor([index.setdefault(c, len(index)) for c in captions])
    return CaptionedImages(pixels, [torch.tensor(x, dtype=torch.long) for x in ids], caption_ids, skipped)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     caption_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalized (B, E) embeddings; same caption id = positive pair."""
    logits = logit_scale.exp().clamp(max=100.0) * image_emb @ text_emb.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)  # symmetric, so it serves both directions
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


BIGRAM_BUCKETS = 8192  # hashed token pairs; a demo caption set has a few hundred distinct ones


def _bigrams(ids: torch.Tensor) -> torch.Tensor:
    """(L,) token ids -> (max(L - 1, 1),) hashed ids of adjacent pairs (a one-token caption: the token)."""
    if len(ids) < 2:
        return ids % BIGRAM_BUCKETS
    return (ids[:-1] * 1_000_003 + ids[1:]) % BIGRAM_BUCKETS


def _bag(table: nn.EmbeddingBag, rows: list[torch.Tensor]) -> torch.Tensor:
    """(B, E): the mean of `table`'s rows for each of the B id lists."""
    offsets = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0)
    return table(torch.cat(rows), offsets)


def pretrain_vision_tower(tower: nn.Module, data: CaptionedImages, vocab_size: int, *, steps: int,
                          batch_size: int, lr: float, seed: int, show_progress: bool = True) -> list[float]:
    """Train `tower` in place; returns the loss of every step. Constant learning rate (AdamW, no decay)."""
    width = tower.embeddings.patch_embedding.out_channels
    g = torch.Generator().manual_seed(seed)
    words = nn.EmbeddingBag(vocab_size, width, mode="mean")
    pairs = nn.EmbeddingBag(BIGRAM_BUCKETS, width, mode="mean")
    head = nn.Linear(width, width, bias=False)
    with torch.no_grad():
        words.weight.normal_(0.0, 0.02, generator=g)
        pairs.weight.normal_(0.0, 0.02, generator=g)
        head.weight.normal_(0.0, width ** -0.5, generator=g)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*tower.parameters(), *words.parameters(), *pairs.parameters(), *head.parameters(), logit_scale]
    for p in tower.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = len(data.caption_ids)
    losses = []
    bar = progress(steps, desc="vision pretraining (contrastive)", unit="step", enabled=show_progress)
    tower.train()
    for _ in range(steps):
        idx = torch.randint(n, (batch_size,), generator=g)
        image_emb = F.normalize(head(tower(data.pixels[idx].float()).mean(1)), dim=-1)
        toks = [data.token_ids[i] for i in idx.tolist()]
        text_emb = F.normalize(_bag(words, toks) + _bag(pairs, [_bigrams(t) for t in toks]), dim=-1)
        loss = contrastive_loss(image_emb, text_emb, logit_scale, data.caption_ids[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(f"loss {losses[-1]:.3f}")
        bar.update(1)
    bar.close()
    return losses
