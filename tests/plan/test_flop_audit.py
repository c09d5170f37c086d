"""The FLOP audit (fastllava/flop_audit.py) at a tiny shape, against independent counts: fastllava executes
exactly FlopModel's useful FLOPs; transformers' Llava, unpadded and without recomputation, does too but
for its vision tower's unused last layer; and each line of the reference's breakdown is the hand count
of what that choice adds: the decoder layers and the LM head on the padded rows, and a second forward of
every decoder layer whose attention runs causal on the real tokens only (FlashAttention-2's unpadded
path, not SDPA over the padded square). Counted as SDPA over the padded square (the audit before
2026-12-06), the unpadded line already fails. The same for each tower x decoder pairing of the recipes."""

import numpy as np
import pytest

from fastllava.data.profile import STAGE_PROFILES
from fastllava.flop_audit import audit_flops, format_breakdown
from fastllava.flops import FlopModel, attention_flops
from fastllava.model import TextConfig
from fastllava.reference import make_samples, step_batches
from fastllava.testing import tiny_config


SIGLIP = {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
QWEN2 = {"model_type": "qwen2", "qkv_bias": True, "num_key_value_heads": 1, "tie_word_embeddings": True,
         "rope_theta": 1e6}
# Qwen3's block where this checkout has it (TextConfig.qk_norm): per-head norms on q and k, and a head width
# that is not hidden / heads (4 heads of 24 over a width of 64).
QWEN3 = {"model_type": "qwen3", "qk_norm": True, "head_dim": 24, "num_key_value_heads": 2}
PAIRINGS = {"clip-llama": ({}, {}), "siglip-qwen2-tied": (SIGLIP, QWEN2), "clip-qwen3": ({}, QWEN3)}


def _pairing(name):
    vision, text = PAIRINGS[name]
    if "qk_norm" in text and "qk_norm" not in TextConfig.__dataclass_fields__:
        pytest.skip("this checkout has no Qwen3 block (TextConfig.qk_norm)")
    return tiny_config(vision=vision, text={**text, "num_hidden_layers": 4})  # > 2: 1 and 2 layers extrapolated


@pytest.mark.slow
@pytest.mark.parametrize("pairing", list(PAIRINGS))
def test_flop_audit_against_hand_counts(pairing):
    """Every tower x decoder pairing the recipes train: the q/k/v biases and q/k norms add no matmul, a tied
    LM head runs the same GEMMs as an untied one, a SigLIP tower runs (and LLaVA-NeXT's reference reads) its
    patches without a CLS token and without its pooling head."""
    cfg = _pairing(pairing)
    stage, world, n = "finetune", 2, 32
    audit = audit_flops(cfg, stage, world=world, max_tokens=2048, checkpointing="none", global_batch=n)
    assert audit.fastllava == pytest.approx(audit.useful, rel=1e-9)  # no checkpointing: nothing recomputed
    lines = {k: v * audit.useful for k, v in audit.breakdown.items()}
    v = cfg.vision  # the reference's tower also runs its last layer, whose output LLaVA never reads
    s = v.num_patches + v.has_class_token
    last_layer = 2 * s * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * v.hidden_size * s * s
    assert cfg.num_vision_layers_run == v.num_hidden_layers - 1
    assert lines["residual"] == pytest.approx(audit.images * last_layer, rel=1e-9)

    samples = make_samples(cfg, STAGE_PROFILES[stage], n, seed=0)  # what the audit drew (seed 0)
    lengths = np.array([s["length"] for s in samples])
    batches = step_batches(samples, world)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    t = cfg.text
    head = 6 * t.vocab_size * t.hidden_size  # forward, input and weight gradients per row
    layers = FlopModel.build(cfg, stage).llm_per_token - head
    assert lines["padding"] == pytest.approx((padded - lengths.sum()) * layers, rel=1e-9)
    assert lines["logits"] == pytest.approx((padded - lengths.sum()) * head, rel=1e-9)
    causal_forward = t.num_hidden_layers * attention_flops(t.num_attention_heads, t.attention_head_dim,
                                                           int((lengths**2).sum()), causal=True)
    # A second forward of every decoder layer but its last GEMM (down_proj): torch's non-reentrant
    # checkpoint stops recomputing once the backward has every tensor it saved.
    down_proj = 2 * t.hidden_size * t.intermediate_size * t.num_hidden_layers
    assert lines["recompute"] == pytest.approx(padded * (layers / 3 - down_proj) + causal_forward, rel=1e-9)
    assert audit.reference == pytest.approx(lines["executed"], rel=1e-12)
    assert lines["sdpa_square"] > 0  # SDPA over the padded square counts more attention
    assert "| recomputation: gradient checkpointing's second forward | +" in format_breakdown([audit])
