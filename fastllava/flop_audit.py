"""Executed FLOPs of one optimizer step, fastllava against the reference, counted without a GPU.

`audit_flops` draws the stage's global batch from its length profile (fastllava.reference.make_samples)
and counts one optimizer step over all ranks under FlopCounterMode on fake tensors, for fastllava (its
packs from plan_steps, its activation checkpointing) and for the reference as LLaVA runs it
(fastllava/reference.py: LLaVA's padded batches of 16, gradient checkpointing, FlashAttention-2), on
the same samples, against the useful FLOPs of fastllava/flops.py. Every count uses the one FLOP
convention of fastllava/ops/_library.py.

The reference's attention is counted as FlashAttention-2 runs it: transformers' FA2 path unpads the
padded batch and runs causal varlen attention on the real tokens, so the audit gives the reference an
attention function that does the same (gather the real tokens, fastllava's varlen attention op, scatter
back), counted by the op's formula; the linear layers and the LM head still run on the padding. The
reference's overhead is split into what each of its choices adds (`FlopAudit.breakdown`): the vision
tower's last layer (transformers' and LLaVA's towers run every layer and take the second-to-last one's
output; fastllava stops there), padding in the decoder layers, the LM head and loss over the padding
(full-length logits), gradient checkpointing's recomputed forward, and, for comparison, what counting
attention as full-square SDPA over the padded length (torch's formulas, backward 2.5x: how this audit
counted it until 2026-12-06) adds on top.

Decoder layers are identical, so every count is exactly affine in the layer count: the audit runs 1 and
2 layers and extrapolates (exact, and 16-20x cheaper than the full depth).

AnyRes (an AnyRes config, LLaVA-NeXT): the samples carry images of the profile's sizes, each its own token
count and tiles; the reference is LLaVA-NeXT's step (fastllava/reference.py: per-device batches of 4,
LlavaNext), and with `unfreeze_vision` both paths train the tower (its backward is counted, and the
reference's gradient checkpointing recomputes it as transformers checkpoints every encoder layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .batch import PackedBatch
from .data.profile import STAGE_PROFILES
from .flops import ATTENTION_BACKWARD_FACTOR
from .model import Backends, Llava, LlavaConfig
from .reference import build_reference, device_batch, make_samples, pad_batch, reference_loss, step_batches

GLOBAL_BATCH = {"align": 256, "finetune": 128}  # LLaVA-1.5's samples per optimizer step (scripts/v1_5)
# The reference variants counted; each differs from "executed" in one choice.
VARIANTS = ("executed", "no_recompute", "unpadded", "sdpa_square")
# The split of the reference's executed / useful ratio, in the order of the table.
BREAKDOWN = (("useful", "useful FLOPs (flops.py)"),
             ("residual", "vision tower's last layer: run, output unused (LLaVA takes layer -2)"),
             ("padding", "padding: decoder layers on the padded rows"),
             ("logits", "full-length logits: LM head + loss on the padded rows"),
             ("recompute", "recomputation: gradient checkpointing's second forward"),
             ("executed", "= reference executed (FlashAttention-2, as LLaVA trains)"),
             ("sdpa_square", "attention as SDPA on the padded square: no causal half, backward 2.5x"),
             ("as_sdpa", "= with attention counted that way (this audit until 2026-12-06)"))


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, q, k, v)


def _sdpa_cpu_backward_convention(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return ATTENTION_BACKWARD_FACTOR * sdpa_flop_count(q, k, v)


def _count(fn, torch_backward: bool = False) -> dict[str, int]:
    """FlopCounterMode's counts for fn(): {"total": ..., "lm_head": ...}. torch has no formula for the CPU
    flash-attention op that SDPA picks on this planning device (the vision towers' attention, and the
    reference's in the "sdpa_square" variant); its forward is counted with torch's SDPA formula (full
    s_q x s_k, as a padded, masked batch executes on a GPU), its backward (a trained tower's) by the one
    convention (ATTENTION_BACKWARD_FACTOR x the forward), or with `torch_backward` by torch's (2.5x: the
    "sdpa_square" variant)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    backward = _sdpa_cpu_backward_flops if torch_backward else _sdpa_cpu_backward_convention
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    head = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith(".lm_head"))
    return {"total": counter.get_total_flops(), "lm_head": head}


class _Unpadded:
    """FlashAttention-2's view of a padded batch (transformers' _upad_input): the flat rows of the real
    tokens in the (B * S) layout, cu_seqlens and the longest length. Made outside the fake mode, so the
    attention op's FLOP formula reads the real lengths (a fake cu_seqlens is counted at its upper bound).
    """

    def __init__(self, lengths: list[int], padded_length: int):
        self.rows = torch.cat([torch.arange(n) + b * padded_length for b, n in enumerate(lengths)])
        self.cu_seqlens = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
        self.max_seqlen = max(lengths)


FA2_AS_COUNTED = "fastllava_fa2_count"


def _register_fa2(current: list[_Unpadded]) -> None:
    """An attention implementation for transformers that computes what FA2's padded path computes:
    causal attention on the real tokens only, through fastllava's varlen op (so its one FLOP formula
    counts it). Registered with transformers' AttentionInterface; with no mask function registered for it,
    transformers passes no mask: the rows are those of current[0], the batch being run (gradient
    checkpointing's recomputation in the backward reads the same)."""
    from transformers import AttentionInterface

    from .ops import varlen_attention

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, H, S, D = query.shape
        batch = current[0]

        def unpad(x):  # (B, heads, S, D) -> (real tokens, heads, D)
            return x.transpose(1, 2).reshape(B * S, x.shape[1], D)[batch.rows]
        out = varlen_attention(unpad(query), unpad(key), unpad(value), batch.cu_seqlens, batch.max_seqlen,
                               causal=True, softmax_scale=scaling, backend="torch")
        return out.new_zeros(B * S, H, D).index_copy(0, batch.rows, out).view(B, S, H, D), None

    AttentionInterface.register(FA2_AS_COUNTED, attend)


def _reference_counts(config, stage, samples, batches, variant: str, unfreeze_vision: bool) -> dict[str, int]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    current: list[_Unpadded] = []
    _register_fa2(current)
    if variant == "unpadded":
        batches = [[i] for b in batches for i in b]
    llm = "sdpa" if variant == "sdpa_square" else FA2_AS_COUNTED
    # Made outside the fake mode: the unpadding rows and the image positions are host-known.
    padded = [pad_batch(config, [samples[i] for i in b]) for b in batches]
    unpadded = [_Unpadded(p.lengths, p.input_ids.shape[1]) for p in padded]
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_reference(config, stage, checkpointing=variant not in ("no_recompute", "unpadded"),
                                attn_implementation={"": "sdpa", "text_config": llm, "vision_config": "sdpa"},
                                unfreeze_vision=unfreeze_vision)

        def step():
            for batch, rows in zip(padded, unpadded):
                current[:] = [rows]
                (reference_loss(model, config, batch) / len(padded)).backward()
        return _count(step, torch_backward=variant == "sdpa_square")


def _fastllava_counts(config, stage, packs, checkpointing, unfreeze_vision: bool) -> dict[str, int]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .train.distributed import apply_activation_checkpointing
    from .train.freeze import set_trainable

    labels = max(sum(p.num_label_tokens() for p in packs), 1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = Llava(config, Backends(attention="torch", projector="torch", merge="torch", loss="torch"))
        set_trainable(model, stage, unfreeze_vision)
        if checkpointing != "none":  # as parallelize does: the decoder, and the tower when it trains
            for layers in [model.language_model.layers] + ([model.vision_tower.layers] if unfreeze_vision else []):
                for i, block in enumerate(layers):
                    layers[i] = apply_activation_checkpointing(block, checkpointing)

        def step():
            for pack in packs:
                (model(pack).loss_sum / labels).backward()
        return _count(step)


@dataclass
class FlopAudit:
    stage: str
    useful: float  # FlopModel's FLOPs of the step's samples
    fastllava: float  # executed, FlopCounterMode
    reference: float  # executed as LLaVA trains (FlashAttention-2)
    images: int = 0  # images the tower encodes in the step (AnyRes: every base image and tile)
    breakdown: dict[str, float] = field(default_factory=dict)  # BREAKDOWN keys -> fraction of useful

    def ratios(self) -> tuple[float, float]:
        return self.fastllava / self.useful, self.reference / self.useful


def _breakdown(useful: float, counts: dict[str, dict[str, float]]) -> dict[str, float]:
    """The reference's counts as fractions of useful, each line what one choice adds (BREAKDOWN)."""
    ex, nr, un, sq = (counts[v] for v in VARIANTS)
    logits = nr["lm_head"] - un["lm_head"]
    lines = {"useful": useful, "residual": un["total"] - useful, "padding": nr["total"] - un["total"] - logits,
             "logits": logits, "recompute": ex["total"] - nr["total"], "executed": ex["total"],
             "sdpa_square": sq["total"] - ex["total"], "as_sdpa": sq["total"]}
    return {k: v / useful for k, v in lines.items()}


def audit_flops(config: LlavaConfig, stage: str, *, world: int = 8, max_tokens: int = 8192,
                checkpointing: str = "none", global_batch: int | None = None, seed: int = 0,
                depths: tuple[int, int] = (1, 2), unfreeze_vision: bool = False) -> FlopAudit:
    """Executed FLOPs of one optimizer step (all ranks) of both paths on the same samples, the useful
    FLOPs, and the reference's breakdown; counts at two decoder depths a < b extrapolated exactly to the
    config's depth (affine in L). unfreeze_vision: the tower trains in both paths (stage finetune)."""
    from .data.packing import plan_steps
    from .flops import FlopModel

    n = global_batch or GLOBAL_BATCH[stage]
    samples = make_samples(config, STAGE_PROFILES[stage], n, seed)
    lengths = np.array([s["length"] for s in samples])
    tiles = np.array([0 if s["pixel_values"] is None else s["pixel_values"].shape[0] for s in samples])
    plan = plan_steps(lengths, n, max_tokens, num_ranks=world, seed=seed)[0]
    packs = [PackedBatch.from_samples([samples[i] for i in b], image_token_id=config.image_token_id,
                                      num_image_tokens=config.num_image_tokens, anyres=config.anyres)
             for r in range(world) for b in plan.rank(r) if b]
    batches = step_batches(samples, world, seed, batch_size=device_batch(config))
    assert set(np.concatenate(batches).tolist()) == set(range(n)), "the reference's step must hold the same samples"
    L = config.text.num_hidden_layers
    at_depth = []
    for d in (depths if L > depths[1] else (L,)):
        c = replace(config, text=replace(config.text, num_hidden_layers=d))
        counts = {v: _reference_counts(c, stage, samples, batches, v, unfreeze_vision) for v in VARIANTS}
        counts["fastllava"] = _fastllava_counts(c, stage, packs, checkpointing, unfreeze_vision)
        at_depth.append(counts)
    if len(at_depth) == 2:
        f = (L - depths[0]) / (depths[1] - depths[0])
        at_depth = [{k: {m: at_depth[0][k][m] + f * (at_depth[1][k][m] - at_depth[0][k][m]) for m in at_depth[0][k]}
                     for k in at_depth[0]}]
    counts, = at_depth
    useful = FlopModel.build(config, stage, unfreeze_vision).flops(
        int(lengths.sum()), int((lengths.astype(np.float64) ** 2).sum()), int(tiles.sum()))
    return FlopAudit(stage, useful, counts["fastllava"]["total"], counts["executed"]["total"], int(tiles.sum()),
                     _breakdown(useful, counts))


def format_breakdown(audits: list[FlopAudit]) -> str:
    """Markdown: the reference's executed / useful ratio per stage, split by what each choice adds."""
    rows = ["| reference executed / useful | " + " | ".join(a.stage for a in audits) + " |",
            "|---|" + "---|" * len(audits)]
    for key, label in BREAKDOWN:
        cells = " | ".join(f"{a.breakdown[key]:.3f}" if key in ("useful", "executed", "as_sdpa")
                           else f"{a.breakdown[key]:+.3f}" for a in audits)
        rows.append(f"| {label} | {cells} |")
    return "\n".join(rows)
