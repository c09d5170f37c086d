"""Useful model FLOPs of a LLaVA training step: what MFU divides, what the planner projects wall clock from.

Per optimizer step, following docs/training.md ("What you see") and the design notes on throughput:
  LLM matmuls   6 N per token when the LLM trains (forward 2N + activation grads 2N + weight grads 2N),
                4 N when it is frozen (stage 1: no weight-gradient GEMMs); N = non-embedding matmul
                weights incl. the LM head (q/k/v widths heads x head_dim: Qwen3's head_dim is not
                hidden / heads). LoRA: 4 N + 6 r (in + out) per adapted layer (the adapters train).
                Elementwise work is not counted, as FlopCounterMode does not: norms (Qwen3's q/k norms
                too), activations, Qwen2's q/k/v biases (q + 2 kv adds per layer and token: under
                0.001% of Qwen2.5-7B's 6 N). A tied LM head runs the same GEMMs as an untied one.
  LLM attention causal forward 2 L d sum(l_i^2); backward twice the forward (both stages need dQ/dK/dV).
                The convention (backward 2x, not the 2.5x a flash kernel executes) is written once, in
                fastllava/ops/_library.py, and re-exported here: the ops' FlopCounterMode formulas, this
                model and the benchmarks' TFLOP/s all count attention, the projector and the LM head
                with those functions.
  vision tower  forward only when frozen: 2 N_vit per token + non-causal attention 4 L C S^2 per image,
                S = patches (+ CLS; SigLIP has none: 729 at 384 px) per image, only the layers that run
                (SigLIP's pooling head never does), + the patch embedding
                (2 x 3 p^2 C per patch); x3 when it trains (x2 for the patch embedding: no pixel grads).
  projector     6 N_proj per visual token (trained in both stages), less the first layer's input
                gradient (2 C d per visual token) when the tower is frozen: nothing upstream needs it.
Recomputation by activation checkpointing is not counted (it is not useful work). nanoGPT counts MFU the
same way (PaLM appendix B). The coefficients are checked against torch's FlopCounterMode in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model.config import LlavaConfig
from .ops._library import ATTENTION_BACKWARD_FACTOR, attention_flops, linear_cross_entropy_flops, mlp_projector_flops

__all__ = ["ATTENTION_BACKWARD_FACTOR", "FlopModel", "attention_flops", "linear_cross_entropy_flops",
           "mlp_projector_flops", "pack_stats"]


@dataclass
class FlopModel:
    """Per-token / per-image FLOP coefficients of one model and stage."""

    llm_per_token: float  # matmul FLOPs per LLM token, forward + backward
    llm_attn_coeff: float  # x sum(l_i^2): causal attention FLOPs, forward + backward
    vision_matmul_per_image: float  # patch embedding + encoder matmuls (x3 when the tower trains)
    vision_attn_per_image: float
    projector_per_image: float

    @classmethod
    def build(cls, config: LlavaConfig, stage: str, unfreeze_vision: bool = False, lora=None) -> "FlopModel":
        """The coefficients of `config` trained in `stage` ("align" or "finetune"); `lora` (a LoRAConfig):
        the LLM is frozen (4 N) and its adapters train (6 r (in + out) per adapted layer per token)."""
        t, v = config.text, config.vision
        q = t.num_attention_heads * t.attention_head_dim
        kv = t.num_key_value_heads * t.attention_head_dim
        d, f = t.hidden_size, t.intermediate_size
        shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                  "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}  # (in, out)
        per_layer = sum(i * o for i, o in shapes.values())
        n_llm = t.num_hidden_layers * per_layer + t.vocab_size * t.hidden_size
        adapters = lora is not None and lora.rank > 0
        llm_factor = 6 if stage == "finetune" and not adapters else 4
        if adapters:
            llm_factor += 6 * t.num_hidden_layers * lora.rank * sum(sum(shapes[n]) for n in lora.targets) / n_llm
        # per unit of sum(l_i^2): forward (2 L d, causal) + backward, every layer
        attn = t.num_hidden_layers * sum(attention_flops(t.num_attention_heads, t.attention_head_dim, 1, causal=True,
                                                         backward=b) for b in (False, True))

        c = v.hidden_size
        vit_layers = config.num_vision_layers_run
        n_vit = vit_layers * (4 * c * c + 2 * c * v.intermediate_size)
        s = v.num_patches + int(v.has_class_token)  # CLIP runs on its CLS token too; SigLIP has none
        patch_embed = 2 * v.num_channels * v.patch_size**2 * c * v.num_patches
        vit_factor = 3 if unfreeze_vision else 1
        depth = config.projector_depth
        n_proj = c * t.hidden_size + (depth - 1) * t.hidden_size * t.hidden_size
        # A frozen tower needs no gradient of its features: the first projector layer's dX GEMM never runs.
        proj_per_token = 6 * n_proj - (0 if unfreeze_vision else 2 * c * t.hidden_size)
        return cls(
            llm_per_token=llm_factor * n_llm,
            llm_attn_coeff=attn,
            # The patch embedding never needs an input gradient (pixels): x2, not x3, when it trains.
            vision_matmul_per_image=vit_factor * 2 * n_vit * s + (2 if unfreeze_vision else 1) * patch_embed,
            vision_attn_per_image=vit_factor * vit_layers * attention_flops(
                v.num_attention_heads, c // v.num_attention_heads, s * s, causal=False),
            projector_per_image=proj_per_token * config.num_image_tokens,
        )

    @property
    def per_image(self) -> float:
        """Vision tower + projector FLOPs of one image."""
        return self.vision_matmul_per_image + self.vision_attn_per_image + self.projector_per_image

    def flops(self, tokens: int, sum_sq_seqlens: int, images: int) -> float:
        """FLOPs of `tokens` LLM tokens in samples whose squared lengths sum to `sum_sq_seqlens`, with
        `images` images."""
        return self.llm_per_token * tokens + self.llm_attn_coeff * sum_sq_seqlens + self.per_image * images


def pack_stats(batch) -> tuple[int, int, int]:
    """(tokens, sum of squared sample lengths, images) of a PackedBatch: the arguments of FlopModel.flops. The
    images are what the tower encodes (an AnyRes image's base image and tiles each count as one): the tower and
    the projector run on every tile; the per-image gather that follows is no FLOP."""
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    return batch.num_tokens, int((lens * lens).sum()), batch.num_tiles
