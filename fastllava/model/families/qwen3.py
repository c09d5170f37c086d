"""The Qwen3 decoder (Qwen3ForCausalLM): LLaMA's block with an RMSNorm over each head of q and k before RoPE.

Qwen3's head width is its own config field, not hidden_size / num_attention_heads (Qwen3-0.6B: width 1024, 16
heads of 128), which TextConfig.head_dim already holds. No bias on the projections unless `attention_bias`
(then on q/k/v and o_proj, as transformers builds it); the small sizes tie the LM head to the embeddings. Its
checkpoints use LLaMA's key names plus `self_attn.q_norm.weight` / `k_norm.weight`, which map as any other
decoder key, so the key mapping is the LLaMA family's; the sliding window is refused as Qwen2's is.
"""

from __future__ import annotations

from ..config import TextConfig
from .family import Family
from .llama import checkpoint_key, module_name, standard_key
from .qwen2 import read_qwen_config, write_qwen_config


def read_config(raw: dict) -> TextConfig:
    return read_qwen_config(raw, "Qwen3", model_type="qwen3", qk_norm=True)


def write_config(config) -> dict:
    return write_qwen_config(config, "Qwen3ForCausalLM")


QWEN3 = Family(name="Qwen3", role="decoder", model_types=("qwen3",), read_config=read_config,
               write_config=write_config, standard_key=standard_key, module_name=module_name,
               checkpoint_key=checkpoint_key)
