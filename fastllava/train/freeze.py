"""Which weights train in each stage.

align     (stage 1): the projector only. Vision tower and LLM are frozen with requires_grad=False,
          so autograd never computes their weight gradients; the activation gradient still flows back
          through the LLM to the projector, which sits before it.
finetune  (stage 2): projector + LLM (embeddings, blocks, norm, head); the vision tower stays frozen
          unless `unfreeze_vision`.
Must run before `parallelize` (FSDP2 keeps requires_grad per parameter) and before the optimizer is
built (only trainable parameters get optimizer state).
"""

from __future__ import annotations

from torch import nn

STAGES = ("align", "finetune")


def set_trainable(model: nn.Module, stage: str, unfreeze_vision: bool = False) -> dict[str, int]:
    """Set requires_grad for `stage`; returns {"trainable": n, "frozen": n} parameter element counts."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if stage == "finetune":
        model.language_model.requires_grad_(True)
        if hasattr(model, "lm_head"):
            model.lm_head.requires_grad_(True)
        if unfreeze_vision:
            model.vision_tower.requires_grad_(True)
    elif unfreeze_vision:
        raise ValueError("unfreeze_vision is a stage-2 (finetune) option; stage 'align' trains only the projector")
    counts = {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
