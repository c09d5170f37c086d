"""Checkpoint key names of the LLaVA layouts and how they map onto our parameter names.

Every checkpoint key is first rewritten to its *canonical* llava-hf name (the layout of
llava-hf/llava-1.5-7b-hf, which transformers 4.x and 5.x both load): the tower's standard keys under
`vision_tower.`, the decoder's under `language_model.` (families/: `vision_tower.vision_model.*`,
`language_model.model.*`, `language_model.lm_head.weight` for CLIP and LLaMA), the projector as
`multi_modal_projector.linear_N.*`, AnyRes's learned newline as `image_newline`. The projector, the newline and
the layouts (llava-hf spellings, original LLaVA's LlavaLlamaForCausalLM) are named here; each tower's and
decoder's own names in its family.
"""

from __future__ import annotations

import re

from . import families
from .config import LlavaConfig

ROLE_PREFIX = {"tower": "vision_tower.", "decoder": "language_model."}
VISION = "vision_tower.vision_model."  # where llava-hf puts a tower's `vision_model.*`
LLM = "language_model.model."
LM_HEAD = "language_model.lm_head.weight"
NEWLINE = "image_newline"  # AnyRes (LlavaNext): the learned feature ending each row of an image's tiles
_PROJECTOR = re.compile(r"^multi_modal_projector\.linear_(\d+)\.(weight|bias)$")


def canonical_llava_key(key: str) -> str:
    """Any llava-hf spelling (hub layout, transformers-5 in-memory layout) -> the hub layout."""
    for prefix, repl in (
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", LLM),
        ("model.image_newline", NEWLINE),
    ):
        if key.startswith(prefix):
            key = repl + key[len(prefix) :]
    if key == "lm_head.weight":
        key = LM_HEAD
    if key.startswith("vision_tower.") and not key.startswith(VISION):
        key = VISION + key[len("vision_tower.") :]
    return key


def original_llava_key(key: str, config: LlavaConfig) -> str:
    """Original LLaVA (LlavaLlamaForCausalLM) name -> canonical llava-hf name."""
    if key == "lm_head.weight":
        return LM_HEAD
    if key == "model." + NEWLINE:
        return NEWLINE
    if key.startswith("model.vision_tower.vision_tower."):
        return VISION + key[len("model.vision_tower.vision_tower.vision_model.") :]
    m = re.match(r"^(?:model\.)?mm_projector\.(?:(\d+)\.)?(weight|bias)$", key)
    if m:
        index = int(m.group(1) or 0)
        if config.projector_depth > 1 and index % 2:
            raise ValueError(f"projector key {key!r}: odd Sequential indices are the GELUs and hold no weights")
        return f"multi_modal_projector.linear_{index // 2 + 1}.{m.group(2)}"
    if key.startswith("model."):
        return LLM + key[len("model.") :]
    return key


def original_llava_name(key: str, depth: int) -> str:
    """Canonical llava-hf name of a decoder or projector tensor -> its original LLaVA name (inverse of
    original_llava_key): the decoder's standard keys as they are, model.mm_projector[.<Sequential index>].*"""
    m = _PROJECTOR.match(key)
    if m:
        return "model.mm_projector." + ("" if depth == 1 else f"{2 * (int(m.group(1)) - 1)}.") + m.group(2)
    if key == NEWLINE:
        return "model." + NEWLINE
    assert key.startswith(ROLE_PREFIX["decoder"]), key
    return key[len(ROLE_PREFIX["decoder"]):]


def to_module_name(key: str, config: LlavaConfig) -> str | None:
    """Canonical llava-hf name -> our parameter name, or None for a tensor the forward does not use.

    Raises ValueError for a key that is not part of a LLaVA checkpoint at all.
    """
    for family in families.of(config):
        prefix = ROLE_PREFIX[family.role]
        if key.startswith(prefix):
            try:
                return family.module_name(key[len(prefix):], config)
            except LookupError:
                break
    m = _PROJECTOR.match(key)
    if m and 1 <= int(m.group(1)) <= config.projector_depth:
        return f"projector.linears.{int(m.group(1)) - 1}.{m.group(2)}"
    if key == NEWLINE and config.anyres is not None:
        return NEWLINE
    raise ValueError(f"unexpected key {key!r}: not part of a LLaVA checkpoint with this config")


def to_checkpoint_key(name: str, config: LlavaConfig) -> str:
    """Our parameter name -> canonical llava-hf name (inverse of to_module_name)."""
    m = re.match(r"^projector\.linears\.(\d+)\.(weight|bias)$", name)
    if m:
        return f"multi_modal_projector.linear_{int(m.group(1)) + 1}.{m.group(2)}"
    if name == NEWLINE:
        return NEWLINE
    tower, decoder = families.of(config)
    family = tower if name.startswith("vision_tower.") else decoder
    return ROLE_PREFIX[family.role] + family.checkpoint_key(name)


def split_roles(tensors):
    """(role or "projector", the key without its role prefix: a family's standard key, or the projector's
    canonical key, tensor) for (canonical llava-hf key, tensor) pairs, consumed one at a time."""
    for key, t in tensors:
        role = next((r for r, prefix in ROLE_PREFIX.items() if key.startswith(prefix)), None)
        yield (role, key[len(ROLE_PREFIX[role]):], t) if role else ("projector", key, t)
