"""The SigLIP / SigLIP2 fixed-resolution vision tower (SiglipVisionModel, or a whole SiglipModel of which LLaVA
uses the vision half).

Standard keys: `vision_model.<SiglipVisionTransformer key>`, as CLIP's: the same encoder layers, embeddings
without a class token, no pre-layernorm. Our tower (model/vision.py, VisionConfig.model_type
"siglip_vision_model") maps like CLIP's; later layers, `post_layernorm` and the pooling `head` (LLaVA takes
a hidden state, never the pooled output) are carried, not run. A tower with vision_use_head false (PaliGemma's,
Gemma 3's) has no `head` tensors, and none is made up for it.

SigLIP2 comes in two layouts. The fixed-resolution checkpoints (google/siglip2-so400m-patch14-384,
siglip2-base-patch16-224, ...) are SiglipModel directories, model_type "siglip": this family reads them. The
NaFlex ones (model_type "siglip2", Siglip2VisionModel) embed a variable number of patches per image with a
linear layer and resize their position embeddings to each image's grid; they are refused by name.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig
from ..init import init_transformer_
from . import clip
from .family import Family

_PREFIX = "vision_model."
_PARTS = ("embeddings.", "encoder.", "post_layernorm.", "head.")  # of SiglipVisionTransformer
_OTHER_HALF = ("text_model.", "logit_scale", "logit_bias")  # SiglipModel's rest


_NAFLEX = ("siglip2", "siglip2_vision_model")


def read_config(raw: dict) -> VisionConfig:
    if raw.get("model_type") in _NAFLEX:
        raise ValueError(
            f"model_type {raw['model_type']!r} is a SigLIP2 NaFlex tower (Siglip2VisionModel: a linear patch embedding "
            "over a variable number of patches per image, position embeddings resized to each image), which "
            "fastllava does not run; the fixed-resolution SigLIP2 checkpoints (e.g. google/siglip2-so400m-patch14-384) "
            "are SiglipModel directories (model_type 'siglip') and load as SigLIP")
    if raw.get("model_type") == "siglip":  # a whole SiglipModel: the tower's config is nested
        raw = raw["vision_config"]
    return VisionConfig.from_hf({"vision_use_head": True, **raw, "model_type": "siglip_vision_model"})


def write_config(config) -> dict:
    return {"architectures": ["SiglipVisionModel"], **config.vision.to_hf()}


def module_name(key: str, config) -> str | None:
    if key.startswith(_PREFIX + "head."):
        if not config.vision.pooling_head:
            raise ValueError(f"{key!r}: a pooling head tensor, but the tower's config says vision_use_head false")
        return None
    return clip.module_name(key, config)  # the embeddings, the layers and post_layernorm map as CLIP's


def unused_tensors(config, gen: torch.Generator, *, dtype, device) -> dict[str, torch.Tensor]:
    """CLIP's (post_layernorm, the layers after the selected one) and the pooling head if the config has one,
    by model/init.py's rules, with the shapes SiglipMultiheadAttentionPoolingHead stores."""
    tensors = clip.unused_tensors(config, gen, dtype=dtype, device=device)
    v = config.vision
    if not v.pooling_head:
        return tensors
    with torch.device("meta"):
        head = nn.ModuleDict(dict(
            attention=nn.MultiheadAttention(v.hidden_size, v.num_attention_heads, batch_first=True),
            layernorm=nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps),
            mlp=nn.ModuleDict(dict(fc1=nn.Linear(v.hidden_size, v.intermediate_size),
                                   fc2=nn.Linear(v.intermediate_size, v.hidden_size)))))
        head.probe = nn.Parameter(torch.empty(1, 1, v.hidden_size))
    head = head.to_empty(device=device).to(dtype)
    init_transformer_(head, gen)
    tensors.update({f"{_PREFIX}head.{name}": p.detach() for name, p in head.named_parameters()})
    return tensors


SIGLIP = Family(name="SigLIP", role="tower", model_types=("siglip", "siglip_vision_model", *_NAFLEX),
                read_config=read_config, write_config=write_config,
                standard_key=clip.standard_keys(_PARTS, _OTHER_HALF), module_name=module_name,
                checkpoint_key=clip.checkpoint_key, unused_tensors=unused_tensors,
                image_processor="SiglipImageProcessor")
