"""The reference every comparison runs against: LLaVA-1.5's training step as LLaVA's code runs it, here on
transformers' LlavaForConditionalGeneration, and the synthetic samples both paths train on. The FLOP
audit (fastllava/flop_audit.py, fake tensors) and benchmarks/e2e.py (timed) both build it from here.

What LLaVA does (llava/train/train.py, train_mem.py, llava/model/llava_arch.py, scripts/v1_5/*.sh):
- per-device batches of 16 from its modality-grouped length sampler (fastllava/data/reference_sampler.py),
  each right-padded to its longest sample, with an attention mask;
- the image features computed first and written into the text embeddings
  (prepare_inputs_labels_for_multimodal); the LLM then runs on those embeddings. The tower runs under
  no_grad (CLIPVisionTower.forward), all its layers, and the second-to-last one's patch features
  (mm_vision_select_layer -2, CLS dropped) go through the projector. With other backbones this is
  LLaVA-NeXT's train.py, the same step: its SigLIP tower (SigLipVisionTower) gives every token (there is no
  CLS) and runs no pooling head; it also drops SigLIP's last layer, which transformers' tower here runs.
  Here: the model's own tower and projector, then an index_put at the image placeholders (which also
  keeps transformers' masked_scatter merge, whose count check reads values, out of a fake-tensor run);
- gradient checkpointing on every decoder layer (--gradient_checkpointing True). transformers'
  non-reentrant checkpoint (its default today) stops recomputing a layer once the backward has what it
  needs, so each layer's last GEMM (down_proj) is not recomputed; LLaVA's pinned transformers 4.37 used
  the reentrant one, which recomputes it too;
- attention by FlashAttention-2 (train_mem.py: attn_implementation="flash_attention_2"): transformers
  unpads the batch and runs causal varlen attention on the real tokens; every linear layer and the LM
  head still run on the padding;
- logits and the loss over every position of the padded batch.

LLaVA-NeXT (AnyRes, config.anyres set) is the same step on transformers' LlavaNextForConditionalGeneration, as
LLaVA-NeXT's train.py runs it (scripts/train/finetune_clip.sh): per-device batches of 4 from the same
modality-grouped sampler, model_max_length 4096, every tile of the batch's images through the tower in one
call (encode_images on the concatenated tiles), the tower trained in stage 2 (mm_tunable_parts with
mm_vision_tower, so its forward keeps its graph), gradient checkpointing, FlashAttention-2. The features of
each image are unpadded and end each row with image_newline: here the pack's own feature_index (the same
rows, a gather: no FLOP either way).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .batch import PackedBatch
from .data.profile import sample_profile
from .data.reference_sampler import reference_batches
from .model import LlavaConfig

REFERENCE_DEVICE_BATCH = 16  # LLaVA-1.5's per_device_train_batch_size (scripts/v1_5/finetune.sh, 8 GPUs)
# LLaVA-NeXT's per_device_train_batch_size (scripts/train/finetune_clip.sh) and model_max_length (4096 for the
# v1.6 recipe, where an image alone is up to 2,928 tokens; LLaVA-1.5: 2048).
ANYRES_DEVICE_BATCH = 4
MAX_LENGTH = {False: 2048, True: 4096}
# The parts of transformers' LlavaForConditionalGeneration, for fastllava's one freezing rule.
HF_PARTS = {"projector": ("model.multi_modal_projector",), "llm": ("model.language_model", "lm_head"),
            "vision": ("model.vision_tower",)}
# The labelled share of every synthetic sample (its tail, as an answer). It changes no FLOP count and no
# GEMM: both paths run the LM head on every position, only the loss's normalization sees it.
LABEL_FRACTION = 0.4
BOS = 1


def device_batch(config: LlavaConfig) -> int:
    """The reference's per-device batch: LLaVA-NeXT's for an AnyRes model, LLaVA-1.5's otherwise."""
    return ANYRES_DEVICE_BATCH if config.anyres is not None else REFERENCE_DEVICE_BATCH


def make_sample(config: LlavaConfig, length: int, image: bool, g: torch.Generator, size=None) -> dict:
    """A training sample of `length` tokens once its image is expanded: BOS, the image token if `image`,
    random text ids (never the image token), the last LABEL_FRACTION labelled, random pixels. An AnyRes
    config's image has `size` (height, width): its tiles and its own token count (config.anyres).
    Returns {"input_ids", "labels", "pixel_values" (1, 3, S, S), AnyRes (n_tiles, 3, S, S), or None,
    "length"}, and AnyRes "image_sizes" [size] (or [])."""
    grid = config.anyres
    if image and grid is not None and size is None:
        raise ValueError("make_sample: an AnyRes model's image needs its size (height, width)")
    n_img = 0 if not image else config.num_image_tokens if grid is None else grid.num_tokens(size)
    text = torch.randint(4, config.text.vocab_size - 1, (max(length - 1 - n_img, 1),), generator=g)
    text += (text >= config.image_token_id).long()  # skip the image token's id
    ids = torch.cat([torch.tensor([BOS] + ([config.image_token_id] if image else [])), text])
    labels = ids.clone()
    labels[: len(ids) - int(len(ids) * LABEL_FRACTION)] = -100
    labels[ids == config.image_token_id] = -100
    side = config.vision.image_size
    tiles = 1 if grid is None or not image else grid.num_tiles(size)
    pixels = torch.randn(tiles, 3, side, side, generator=g) if image else None
    out = {"input_ids": ids, "labels": labels, "pixel_values": pixels, "length": len(ids) + max(n_img - 1, 0)}
    if grid is not None:
        out["image_sizes"] = [tuple(size)] if image else []
    return out


def make_samples(config: LlavaConfig, profile: str, n: int, seed: int, max_length: int | None = None) -> list[dict]:
    """`n` samples with lengths (and, AnyRes, image sizes) drawn from `profile` (fastllava.data.profile),
    truncated to max_length (default MAX_LENGTH: the reference's model_max_length)."""
    drawn = sample_profile(profile, n=n, seed=seed, num_image_tokens=config.num_image_tokens,
                           model_max_length=max_length or MAX_LENGTH[config.anyres is not None], anyres=config.anyres)
    g = torch.Generator().manual_seed(seed)
    return [make_sample(config, length, image, g, tuple(size) if image and config.anyres else None)
            for length, image, size in zip(drawn["lengths"].tolist(), drawn["has_image"].tolist(),
                                           drawn["image_size"].tolist())]


def step_batches(samples: list[dict], world: int, seed: int = 0, batch_size: int = REFERENCE_DEVICE_BATCH
                 ) -> list[np.ndarray]:
    """The reference's per-device batches of `batch_size` `samples` (indices), in the order LLaVA's sampler
    deals them to `world` ranks: batches k*world .. (k+1)*world - 1 run as one step. The sampler sorts by the
    text alone (LLaVA's and LLaVA-NeXT's modality_lengths count the conversation's words, never the image's
    tokens), which at AnyRes puts images of very different token counts into one padded batch."""
    lengths = np.array([s["length"] for s in samples])
    has_image = np.array([s["pixel_values"] is not None for s in samples])
    text = np.array([len(s["input_ids"]) for s in samples]) - has_image  # the image token is no text
    return reference_batches(lengths, has_image, batch_size=batch_size, world_size=world, seed=seed,
                             group_lengths=text)


@dataclass
class PaddedBatch:
    """One per-device batch of B samples right-padded to the longest, S tokens, images expanded."""

    input_ids: torch.Tensor  # (B, S) int64, 0 in the padding
    labels: torch.Tensor  # (B, S) int64, -100 in the padding
    attention_mask: torch.Tensor  # (B, S) int64, 1 on real tokens
    pixel_values: torch.Tensor | None  # (N, 3, H, W), the batch's images in order
    image_positions: tuple[torch.Tensor, torch.Tensor]  # (rows, columns) of the N x num_image_tokens placeholders
    lengths: list[int]  # real tokens per row
    # AnyRes: (placeholders,) int64, the row of cat([tile features, image_newline]) each placeholder takes
    feature_index: torch.Tensor | None = None

    def to(self, device, dtype=None) -> "PaddedBatch":
        pixels = None if self.pixel_values is None else self.pixel_values.to(device, dtype)
        index = None if self.feature_index is None else self.feature_index.to(device)
        return PaddedBatch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device), pixels,
                           tuple(i.to(device) for i in self.image_positions), self.lengths, index)


def pad_batch(config: LlavaConfig, samples: list[dict]) -> PaddedBatch:
    """`samples` (make_sample's) as LLaVA batches them: each expanded, right-padded to the longest."""
    seqs = [PackedBatch.from_samples([s], image_token_id=config.image_token_id,
                                     num_image_tokens=config.num_image_tokens, anyres=config.anyres) for s in samples]
    longest = max(s.num_tokens for s in seqs)
    ids = torch.zeros((len(seqs), longest), dtype=torch.long)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, : s.num_tokens], labels[row, : s.num_tokens], mask[row, : s.num_tokens] = s.input_ids, s.labels, 1
    pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    where = (ids == config.image_token_id).nonzero(as_tuple=True)
    index = None
    if config.anyres is not None:  # each sample's feature rows, shifted past the earlier samples' tiles
        per_tile, offset, parts = config.num_image_tokens, 0, []
        for s in seqs:
            newline = s.feature_index == s.num_tiles * per_tile
            parts.append(torch.where(newline, -1, s.feature_index + offset))
            offset += s.num_tiles * per_tile
        index = torch.cat(parts)
        index[index < 0] = offset  # image_newline: the row after every tile's features
    return PaddedBatch(ids, labels, mask, torch.cat(pixels) if pixels else None, where,
                       [s.num_tokens for s in seqs], index)


def build_reference(config: LlavaConfig, stage: str, *, attn_implementation="sdpa", checkpointing: bool = True,
                    dtype: torch.dtype | None = None, unfreeze_vision: bool = False):
    """transformers' LlavaForConditionalGeneration (LlavaNextForConditionalGeneration for an AnyRes config) at
    `config`'s shape, random weights, frozen as `stage` trains it (the tower too with `unfreeze_vision`),
    gradient checkpointing on (LLaVA's recipe; off only to measure what it costs). Built on the current
    default device (a `with torch.device(...)` or a FakeTensorMode around the call)."""
    import transformers
    from torch._guards import detect_fake_mode
    from transformers.initialization import no_init_weights

    from .train.freeze import set_trainable

    kind = "LlavaNext" if config.anyres is not None else "Llava"
    hf_config = getattr(transformers, f"{kind}Config").from_dict(config.to_hf_llava())
    # LLaVA reads a hidden state, never a pooled output: LLaVA-NeXT's SigLIP tower replaces the pooling head by
    # an identity (siglip_encoder.py), so the reference's tower does not run one either.
    if getattr(hf_config.vision_config, "vision_use_head", False):
        hf_config.vision_config.vision_use_head = False
    # Fake tensors have no values to initialize, and SigLIP's truncated-normal init reads one (mask.any()).
    init = no_init_weights() if detect_fake_mode() is not None else nullcontext()
    with init:
        model = getattr(transformers, f"{kind}ForConditionalGeneration")._from_config(
            hf_config, attn_implementation=attn_implementation, dtype=dtype)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    set_trainable(model, stage, unfreeze_vision, parts=HF_PARTS)
    if config.anyres is not None:  # trains with the projector (fastllava/train/freeze.py), as in LLaVA-NeXT
        model.model.image_newline.requires_grad_(True)
    return model


def reference_loss(model, config: LlavaConfig, batch: PaddedBatch) -> torch.Tensor:
    """The batch's mean loss over its label tokens, as LLaVA's forward computes it: image features
    written into the text embeddings, the LLM and the LM head over the padded batch."""
    embeds = model.get_input_embeddings()(batch.input_ids)
    if batch.pixel_values is not None:
        tower = model.model.vision_tower
        trained = any(p.requires_grad for p in tower.parameters())
        with nullcontext() if trained else torch.no_grad():  # LLaVA's CLIPVisionTower.forward, frozen
            hidden = tower(batch.pixel_values.to(embeds.dtype), output_hidden_states=True)
        # LLaVA's select: the CLS dropped where the tower has one ("patch"), every token of a SigLIP tower
        first = int(config.vision.has_class_token and config.vision_feature_select == "patch")
        feats = model.model.multi_modal_projector(hidden.hidden_states[config.vision_feature_layer][:, first:])
        feats = feats.reshape(-1, feats.shape[-1])
        if batch.feature_index is not None:  # AnyRes: each image's unpadded rows, each ended by image_newline
            feats = torch.cat([feats, model.model.image_newline[None].to(feats.dtype)])[batch.feature_index]
        embeds = embeds.index_put(batch.image_positions, feats.to(embeds.dtype))
    return model(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels, use_cache=False).loss
