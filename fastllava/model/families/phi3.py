"""The Phi-3 decoder (Phi3ForCausalLM: Phi-3-mini/medium 4k): LLaMA's block with q/k/v and gate/up stored fused.

Its checkpoints hold `self_attn.qkv_proj.weight` (the q rows, then k, then v: GQA sizes) and
`mlp.gate_up_proj.weight` (gate rows, then up) where LLaMA's hold separate projections; everything else is
LLaMA's key for key (`model.<Phi3Model key>`, `lm_head.weight`), and the block computes what LLaMA's does
(RMSNorm, RoPE over the whole head, silu(gate) * up, no bias; the residual dropouts are 0 in the released
configs and off in eval). So our decoder is LLaMA's with its separate modules, and this family says where the
fused tensors split (`stacked`, model/stacked.py): at load, and stacked again at export.

Refused: LongRoPE (`rope_scaling` "longrope", "su" or "yarn": the 128k variants), a partial rotary factor
below 1 (Phi-4-mini), an activation other than silu. Phi-3's `sliding_window` (2047 in the 4k models) is
TextConfig's: a sample longer than the window is refused, never attended past (TextConfig.check_length).
"""

from __future__ import annotations

from ..config import TextConfig
from .family import Family
from .llama import checkpoint_key, module_name, standard_key

_LONG_ROPES = ("longrope", "su", "yarn")  # Phi3Config reads "su" and "yarn" as "longrope"


def read_config(raw: dict) -> TextConfig:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type in _LONG_ROPES:
        raise ValueError(f"Phi-3 rope_scaling {rope_type!r} (LongRoPE, the 128k-context variants) is not supported: "
                         "fastllava's RoPE has no per-frequency short/long factors; use a 4k-context Phi-3 "
                         "(rope_scaling null)")
    partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"Phi-3 partial_rotary_factor {partial} is not supported: fastllava rotates the whole head "
                         "(1.0, as every Phi-3 config has)")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Phi-3 hidden_act {raw['hidden_act']!r} is not supported: the MLP is silu(gate) * up")
    # Phi3Attention has no bias whatever `attention_bias` says (some Phi-3 configs carry it as false).
    raw = {k: v for k, v in raw.items() if k != "attention_bias"}
    return TextConfig.from_hf(raw, model_type="phi3")


def write_config(config) -> dict:
    return {"architectures": ["Phi3ForCausalLM"], **config.text.to_hf(), "pad_token_id": config.pad_token_id}


def stacked(config) -> dict[str, tuple[tuple[str, int], ...]]:
    """Each layer's qkv_proj (q, k, v rows) and gate_up_proj (gate, up rows), as Phi3Attention and Phi3MLP
    split them."""
    t = config.text
    q, kv = t.num_attention_heads * t.attention_head_dim, t.num_key_value_heads * t.attention_head_dim
    table = {}
    for i in range(t.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        table[attn + "qkv_proj.weight"] = ((attn + "q_proj.weight", q), (attn + "k_proj.weight", kv),
                                           (attn + "v_proj.weight", kv))
        table[mlp + "gate_up_proj.weight"] = ((mlp + "gate_proj.weight", t.intermediate_size),
                                              (mlp + "up_proj.weight", t.intermediate_size))
    return table


PHI3 = Family(name="Phi-3", role="decoder", model_types=("phi3",), read_config=read_config,
              write_config=write_config, standard_key=standard_key, module_name=module_name,
              checkpoint_key=checkpoint_key, stacked=stacked)
