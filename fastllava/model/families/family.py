"""What one model family (a vision tower or a decoder) contributes to checkpoint interop.

Names in three spaces meet here. A family's *own* directory (a CLIPVisionModel, a LlamaForCausalLM) has its
keys; its *standard* keys are those the family's transformers class writes (`vision_model.encoder...`,
`model.layers...`, `lm_head.weight`), which llava-hf nests under a role prefix (`vision_tower.`,
`language_model.`: keys.py); our *module* names are Llava's parameter names. A family maps between them,
reads its config.json into our config dataclass and writes it back; nothing else in model/ knows a
family's key names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ROLES = ("tower", "decoder")


@dataclass(frozen=True)
class Family:
    """One family's key names and config mapping (see the module docstring for the three name spaces).

    name: how messages name it ("CLIP"). role: "tower" (Llava.vision_tower, config.vision) or "decoder"
    (Llava.language_model and lm_head, config.text). model_types: the config.json `model_type` values of
    its own directories, and of the dict its config dataclass writes (`to_hf()`); the registry's keys.
    read_config(raw) -> VisionConfig | TextConfig: from its own config.json dict (ValueError if invalid).
    write_config(config: LlavaConfig) -> dict: config.json of its own directory, with `architectures`.
    standard_key(key) -> str | None: its own directory's key -> standard key; None for a tensor LLaVA never
      uses (CLIP's text tower); LookupError for a key that is not the family's.
    module_name(key, config) -> str | None: standard key -> our parameter name; None for a tensor the
      forward does not use (carried unchanged, model.carried); LookupError for a key that is not the family's.
    checkpoint_key(name) -> str: our parameter name (of this role) -> standard key.
    unused_tensors(config, gen, dtype, device) -> {standard key: tensor}: stand-ins, drawn from `gen`, for the
      tensors module_name maps to None, so a model made from scratch exports completely (None: there are none).
    stacked(config) -> {standard key: ((part standard key, rows), ...)}: the tensors its checkpoints store
      stacked along dim 0 that our model keeps as separate parameters (Phi-3's qkv_proj: q, k, v rows), each
      with its parts in order, named as module_name and checkpoint_key name them; split at load, stacked
      again at export (model/stacked.py). None: the family stacks nothing.
    image_processor: a tower's transformers image processor class ("CLIPImageProcessor"), whose defaults at the
      tower's image_size preprocess its images where no preprocessor_config.json says otherwise (data/images.py
      Preprocess reads both); None for a decoder.
    """

    name: str
    role: str
    model_types: tuple[str, ...]
    read_config: Callable[[dict], object]
    write_config: Callable[[object], dict]
    standard_key: Callable[[str], str | None]
    module_name: Callable[[str, object], str | None]
    checkpoint_key: Callable[[str], str]
    unused_tensors: Callable[..., dict[str, torch.Tensor]] | None = None
    stacked: Callable[[object], dict[str, tuple[tuple[str, int], ...]]] | None = None
    image_processor: str | None = None

    def __post_init__(self):
        assert self.role in ROLES, self.role
        assert (self.image_processor is not None) == (self.role == "tower"), (self.name, self.image_processor)
