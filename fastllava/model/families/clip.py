"""The CLIP vision tower (CLIPVisionModel, or a whole CLIPModel of which LLaVA uses the vision half).

Standard keys: `vision_model.<CLIPVisionTransformer key>`. Our tower (model/vision.py) keeps transformers'
module names below `vision_tower.`, its encoder layers flattened (`encoder.layers.N` -> `layers.N`) and built
only up to the selected feature layer: later layers and `post_layernorm` are carried, not run.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import VisionConfig
from ..init import init_transformer_
from ..vision import CLIPEncoderLayer
from .family import Family

_PREFIX = "vision_model."
_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")  # of CLIPVisionTransformer
_OTHER_HALF = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")  # CLIPModel's rest


def read_config(raw: dict) -> VisionConfig:
    if raw.get("model_type") == "clip":  # a whole CLIPModel: the tower's config is nested
        raw = raw["vision_config"]
    return VisionConfig.from_hf(raw)


def write_config(config) -> dict:
    return {"architectures": ["CLIPVisionModel"], **config.vision.to_hf()}


def standard_keys(parts: tuple[str, ...], other_half: tuple[str, ...]):
    """standard_key of a tower whose transformers class writes `vision_model.<part>` keys (transformers 5 leaves
    the prefix out), in a directory that may hold a whole two-tower model whose `other_half` LLaVA skips."""

    def standard_key(key: str) -> str | None:
        if key.startswith(_PREFIX):
            return key
        if key.startswith(parts):
            return _PREFIX + key
        if key.startswith(other_half):
            return None
        raise LookupError(key)

    return standard_key


standard_key = standard_keys(_PARTS, _OTHER_HALF)


def module_name(key: str, config) -> str | None:
    if not key.startswith(_PREFIX):
        raise LookupError(key)
    rest = key[len(_PREFIX):]
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", rest)
    if m:
        layer = int(m.group(1))
        if layer >= config.vision.num_hidden_layers:
            raise ValueError(f"{key!r}: vision layer {layer} but the config has {config.vision.num_hidden_layers}")
        return f"vision_tower.layers.{layer}.{m.group(2)}" if layer < config.num_vision_layers_run else None
    if rest.startswith(("embeddings.", "pre_layrnorm.")):
        return None if rest == "embeddings.position_ids" else "vision_tower." + rest
    if rest.startswith("post_layernorm."):
        return None
    raise LookupError(key)


def checkpoint_key(name: str) -> str:
    rest = name.removeprefix("vision_tower.")
    return _PREFIX + ("encoder." + rest if rest.startswith("layers.") else rest)


def unused_tensors(config, gen: torch.Generator, *, dtype, device) -> dict[str, torch.Tensor]:
    """post_layernorm and the layers after the selected one, by model/init.py's rules."""
    v = config.vision
    norm = nn.LayerNorm(v.hidden_size, device=device, dtype=dtype)  # its own init is the rule's: 1 and 0
    tensors = {f"{_PREFIX}post_layernorm.{name}": p.detach() for name, p in norm.named_parameters()}
    for i in range(config.num_vision_layers_run, v.num_hidden_layers):
        with torch.device("meta"):  # no draw from torch's global generator: `gen` gives every value
            layer = CLIPEncoderLayer(v)
        layer = layer.to_empty(device=device).to(dtype)
        init_transformer_(layer, gen)
        tensors.update({f"{_PREFIX}encoder.layers.{i}.{name}": p.detach() for name, p in layer.named_parameters()})
    return tensors


CLIP = Family(name="CLIP", role="tower", model_types=("clip", "clip_vision_model"), read_config=read_config,
              write_config=write_config, standard_key=standard_key, module_name=module_name,
              checkpoint_key=checkpoint_key, unused_tensors=unused_tensors, image_processor="CLIPImageProcessor")
