"""Tiny models for tests and CPU benchmarks: one shape, one factory, shared by tests/ and benchmarks/.

A tiny LLaVA has every feature of the real one (CLIP tower with layers after the selected one, a
two-layer projector, a GQA-capable LLaMA decoder) at sizes that run in milliseconds on a CPU. Its
transformers twin (`tiny_hf_llava`) is the independent reference the model tests compare against.
"""

from __future__ import annotations

import torch

from .model import Backends, Llava, LlavaConfig, TextConfig, VisionConfig

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                   patch_size=14)
TINY_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=64)
TINY_IMAGE_TOKEN = 120
# The torch references everywhere: exact on CPU, and what the kernels are tested against.
TORCH_BACKENDS = Backends(attention="torch", projector="torch", merge="torch", loss="torch")


def tiny_config(*, vision: dict | None = None, text: dict | None = None, **fields) -> LlavaConfig:
    """The tiny LLaVA; `vision` and `text` patch its parts, other keywords are LlavaConfig fields
    (projector_type, vision_feature_layer, image_token_id, ...)."""
    return LlavaConfig(vision=VisionConfig(**{**TINY_VISION, **(vision or {})}),
                       text=TextConfig(**{**TINY_TEXT, **(text or {})}),
                       **{"image_token_id": TINY_IMAGE_TOKEN, **fields})


def tiny_model(config: LlavaConfig | None = None, *, seed: int = 0, backends: Backends = TORCH_BACKENDS) -> Llava:
    """A randomly initialized Llava of `config` (default tiny_config()), fp32, torch backends."""
    return Llava.from_config(config or tiny_config(), seed=seed, backends=backends)


def tiny_hf_llava(config: LlavaConfig | None = None, *, seed: int = 0):
    """transformers' LlavaForConditionalGeneration of the same architecture, eval mode, with random weights
    everywhere: transformers' own init leaves norms at 1 and biases at 0, which would hide mistakes in them."""
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlavaForConditionalGeneration

    config = config or tiny_config()
    hf_config = HFLlavaConfig.from_dict(config.to_hf_llava())
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name
            p.copy_(torch.randn_like(p) * (0.1 if is_norm else 0.2) + (is_norm and name.endswith("weight")))
    return model

