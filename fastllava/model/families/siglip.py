"""The SigLIP / SigLIP2 fixed-resolution vision tower (SiglipVisionModel, or a whole SiglipModel of which LLaVA
uses the vision half).

Standard keys: `vision_model.<SiglipVisionTransformer key>`, as CLIP's: the same encoder layers, embeddings
without a class token, no pre-layernorm. Our tower (model/vision.py, VisionConfig.model_type
"siglip_vision_model") maps like CLIP's; later layers, `post_layernorm` and the pooling `head` (LLaVA takes
a hidden state, never the pooled output) are carried, not run.
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


def read_config(raw: dict) -> VisionConfig:
    if raw.get("model_type") == "siglip":  # a whole SiglipModel: the tower's config is nested
        raw = raw["vision_config"]
    return VisionConfig.from_hf({**raw, "model_type": "siglip_vision_model"})


def write_config(config) -> dict:
    return {"architectures": ["SiglipVisionModel"], **config.vision.to_hf()}


def module_name(key: str, config) -> str | None:
    if key.startswith(_PREFIX + "head."):
        return None
    return clip.module_name(key, config)  # the embeddings, the layers and post_layernorm map as CLIP's


def unused_tensors(config, gen: torch.Generator, *, dtype, device) -> dict[str, torch.Tensor]:
    """CLIP's (post_layernorm, the layers after the selected one) and the pooling head, by model/init.py's
    rules, with the shapes SiglipMultiheadAttentionPoolingHead stores."""
    tensors = clip.unused_tensors(config, gen, dtype=dtype, device=device)
    v = config.vision
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


SIGLIP = Family(name="SigLIP", role="tower", model_types=("siglip", "siglip_vision_model"), read_config=read_config,
                write_config=write_config, standard_key=clip.standard_keys(_PARTS, _OTHER_HALF),
                module_name=module_name, checkpoint_key=clip.checkpoint_key, unused_tensors=unused_tensors)
