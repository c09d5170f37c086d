"""The LLaMA decoder (LlamaForCausalLM; Vicuna and LLaVA's own LLM are LLaMA checkpoints).

Standard keys: `model.<LlamaModel key>` and `lm_head.weight`. Our decoder (model/llama.py) keeps
transformers' module names below `language_model.`; the LM head is Llava's `lm_head`.
"""

from __future__ import annotations

import re

from ..config import TextConfig
from .family import Family

_HEAD = "lm_head.weight"


def read_config(raw: dict) -> TextConfig:
    return TextConfig.from_hf(raw)


def write_config(config) -> dict:
    return {"architectures": ["LlamaForCausalLM"], **config.text.to_hf(), "pad_token_id": config.pad_token_id}


def standard_key(key: str) -> str:
    if key == _HEAD or key.startswith("model."):
        return key
    raise LookupError(key)


def module_name(key: str, config) -> str | None:
    if key == _HEAD:
        return None if config.text.tie_word_embeddings else _HEAD
    if not key.startswith("model."):
        raise LookupError(key)
    if re.match(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$", key):
        return None  # old LLaMA checkpoints store the RoPE table; we compute it
    return "language_model." + key[len("model."):]


def checkpoint_key(name: str) -> str:
    return name if name == _HEAD else "model." + name.removeprefix("language_model.")


LLAMA = Family(name="LLaMA", role="decoder", model_types=("llama",), read_config=read_config,
               write_config=write_config, standard_key=standard_key, module_name=module_name,
               checkpoint_key=checkpoint_key)
