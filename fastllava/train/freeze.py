"""Which weights train in each stage: the one rule, for our Llava and for any model laid out like it.

align     (stage 1): the projector only. Vision tower and LLM are frozen with requires_grad=False,
          so autograd never computes their weight gradients; the activation gradient still flows back
          through the LLM to the projector, which sits before it.
finetune  (stage 2): projector + LLM (embeddings, blocks, norm, head); the vision tower stays frozen
          unless `unfreeze_vision`. With LoRA adapters in the LLM (layers/lora.py) the LLM's own weights
          stay frozen and its adapters train instead; an unfrozen tower still trains in full beside them,
          as in LLaVA-NeXT's LoRA runs (its lr: `optim.vision_lr`, train/optim.py).
Must run before `parallelize` (FSDP2 keeps requires_grad per parameter) and before the optimizer is
built (only trainable parameters get optimizer state).
"""

from __future__ import annotations

from torch import nn

from ..layers.lora import is_adapter

STAGES = ("align", "finetune")
# Each part of a LLaVA model as module paths of fastllava's Llava. Other layouts pass their own, e.g.
# benchmarks/e2e.py for transformers' LlavaForConditionalGeneration.
# AnyRes's image_newline (a parameter of Llava, only in AnyRes models) is part of the connector and trains with
# the projector: in every stage-2 run as in LLaVA-NeXT's (which trains all but the tower), and also under LoRA and
# in an AnyRes stage 1, where it starts random (drawn when the model is assembled from components).
LLAVA_PARTS = {"projector": ("projector", "image_newline"), "llm": ("language_model", "lm_head"),
               "vision": ("vision_tower",)}
OPTIONAL = ("image_newline",)  # paths a model may not have (fixed-resolution models have no image_newline)


def _set(model: nn.Module, paths: tuple[str, ...], requires_grad: bool) -> None:
    """requires_grad of the modules (or OPTIONAL parameters) at `paths`; an absent OPTIONAL one is skipped."""
    for path in paths:
        if path not in OPTIONAL:
            model.get_submodule(path).requires_grad_(requires_grad)
        elif hasattr(model, path):
            getattr(model, path).requires_grad_(requires_grad)


def set_trainable(model: nn.Module, stage: str, unfreeze_vision: bool = False,
                  parts: dict[str, tuple[str, ...]] = LLAVA_PARTS) -> dict[str, int]:
    """Set requires_grad for `stage`; returns {"trainable": n, "frozen": n} parameter element counts."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    if unfreeze_vision and stage == "align":
        raise ValueError("unfreeze_vision is a stage-2 (finetune) option; stage 'align' trains only the projector")
    trained = ["projector"] + (["llm"] if stage == "finetune" else []) + (["vision"] if unfreeze_vision else [])
    model.requires_grad_(False)
    for part in trained:
        _set(model, parts[part], True)
    adapters = [p for n, p in model.named_parameters() if is_adapter(n)]
    if adapters and "llm" in trained:
        _set(model, parts["llm"], False)
        for p in adapters:
            p.requires_grad_(True)
    counts = {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (requires_grad), in module order."""
    return [p for p in model.parameters() if p.requires_grad]
