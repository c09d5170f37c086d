"""The model families whose checkpoints fastllava reads and writes, found by their config's `model_type`.

A family is one file here: its key names and config mapping as a `Family` (family.py), registered below.
Adding one (a SigLIP tower, a Qwen or Mistral decoder) is that file plus its line in FAMILIES, and the
modules and config dataclass it maps onto: docs/model.md, "Adding a model family".
"""

from __future__ import annotations

from .clip import CLIP
from .family import ROLES, Family
from .llama import LLAMA
from .siglip import SIGLIP
from .mistral import MISTRAL
from .phi3 import PHI3
from .qwen2 import QWEN2
from .qwen3 import QWEN3

FAMILIES = (CLIP, SIGLIP, LLAMA, QWEN2, QWEN3, MISTRAL, PHI3)

_REGISTRY: dict[tuple[str, str], Family] = {}
for _family in FAMILIES:
    for _model_type in _family.model_types:
        assert (_family.role, _model_type) not in _REGISTRY, (_family.role, _model_type)
        _REGISTRY[_family.role, _model_type] = _family


def find(role: str, model_type, where: str) -> Family:
    """The family of `role` ("tower" or "decoder") that reads `model_type`; ValueError naming `where` (the
    config.json) and the model types there are families for otherwise."""
    assert role in ROLES, role
    family = _REGISTRY.get((role, model_type))
    if family is None:
        known = [t for r, t in _REGISTRY if r == role]
        raise ValueError(f"{where}: model_type {model_type!r}, expected {' or '.join(map(repr, known))} "
                         f"(the {role} families fastllava reads: fastllava/model/families/)")
    return family


def of(config) -> tuple[Family, Family]:
    """(tower, decoder) families of a LlavaConfig, by the model_type its parts write to config.json."""
    return (find("tower", config.vision.to_hf()["model_type"], "config.vision"),
            find("decoder", config.text.to_hf()["model_type"], "config.text"))
