"""The Mistral decoder (MistralForCausalLM): LLaMA's block, no biases, and a sliding window.

Mistral-7B v0.1 masks keys more than `sliding_window` (4096) positions back; v0.2 and v0.3 set it null. For a
sample no longer than the window that mask changes nothing, so the decoder runs the whole-sample attention
and TextConfig.check_length refuses a longer sample or generation (never attending past the window silently).
Checkpoints use LLaMA's key names, so the key mapping is the LLaMA family's.
"""

from __future__ import annotations

from ..config import TextConfig
from .family import Family
from .llama import checkpoint_key, module_name, standard_key

# MistralConfig's default: a config.json without the key has this window in transformers.
DEFAULT_SLIDING_WINDOW = 4096


def read_config(raw: dict) -> TextConfig:
    # MistralAttention has no bias whatever the config says; head_dim may differ from width / heads (Nemo).
    return TextConfig.from_hf(raw, model_type="mistral", attention_bias=False,
                              sliding_window=raw.get("sliding_window", DEFAULT_SLIDING_WINDOW))


def write_config(config) -> dict:
    # to_hf writes sliding_window even when None: left out, transformers would read its default 4096.
    return {"architectures": ["MistralForCausalLM"], **config.text.to_hf(), "pad_token_id": config.pad_token_id}


MISTRAL = Family(name="Mistral", role="decoder", model_types=("mistral",), read_config=read_config,
                 write_config=write_config, standard_key=standard_key, module_name=module_name,
                 checkpoint_key=checkpoint_key)
