"""The Qwen2 / Qwen2.5 decoder (Qwen2ForCausalLM): LLaMA's block with a bias on q/k/v (not o_proj).

Its checkpoints use LLaMA's key names (`model.<Qwen2Model key>`, `lm_head.weight`; the small sizes tie the LM
head to the embeddings and store no `lm_head.weight`), so the key mapping is the LLaMA family's; what differs
is the config: model_type "qwen2", qkv_bias, and the sliding-window fields, which fastllava does not run.
"""

from __future__ import annotations

from ..config import TextConfig
from .family import Family
from .llama import checkpoint_key, module_name, standard_key


def read_qwen_config(raw: dict, name: str, **fields) -> TextConfig:
    """A Qwen2 / Qwen3 config.json dict -> TextConfig with `fields` (model_type and the block's parts)."""
    # Qwen's sliding window (use_sliding_window, off in every released Qwen2/2.5/3 config) masks keys beyond
    # `sliding_window` in the layers from max_window_layers on; varlen attention here attends to the whole
    # sample, so a config that turns it on is refused rather than silently attended past.
    if raw.get("use_sliding_window"):
        raise ValueError(f"{name} config with use_sliding_window true (sliding_window {raw.get('sliding_window')}, "
                         f"max_window_layers {raw.get('max_window_layers')}) is not supported: fastllava attends "
                         f"to the whole sample; set use_sliding_window false (the released {name} models do)")
    # Off, the window is None in transformers, whatever number the released config.json files carry (32768).
    return TextConfig.from_hf(raw, **fields, sliding_window=None)


def write_qwen_config(config, architecture: str) -> dict:
    return {"architectures": [architecture], **config.text.to_hf(), "use_sliding_window": False,
            "pad_token_id": config.pad_token_id}


def read_config(raw: dict) -> TextConfig:
    return read_qwen_config(raw, "Qwen2", model_type="qwen2", qkv_bias=True)


def write_config(config) -> dict:
    return write_qwen_config(config, "Qwen2ForCausalLM")


QWEN2 = Family(name="Qwen2", role="decoder", model_types=("qwen2",), read_config=read_config,
               write_config=write_config, standard_key=standard_key, module_name=module_name,
               checkpoint_key=checkpoint_key)
