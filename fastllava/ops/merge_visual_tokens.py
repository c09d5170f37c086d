"""Text embeddings and image features merged into one (T, D) sequence in a single pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import pick_backend

BACKENDS = ("torch",)


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


def merge_visual_tokens(input_ids, embed_weight, image_features, image_token_id, *, backend="auto"):
    """Gather text rows of embed_weight and place image_features, in order, at the placeholder positions.

    input_ids: (T,) int64; embed_weight: (V, D); image_features: (n_images * tokens_per_image, D);
    the number of positions equal to image_token_id must equal the number of feature rows.
    Returns (T, D) in embed_weight's dtype.
    """
    which = pick_backend(backend, embed_weight, BACKENDS, op="merge_visual_tokens")
    if which == "torch":
        return merge_visual_tokens_reference(input_ids, embed_weight, image_features, image_token_id)
    raise AssertionError(which)
