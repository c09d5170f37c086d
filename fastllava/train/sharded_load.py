"""Multi-rank model loading without the model on every rank: build on the meta device, shard, then read
only this rank's shard.

`build_model(cfg, ids, meta=True)` (train.build) returns a Llava whose parameters are on the meta device
(no memory) with the vocabulary already grown for the tokenizer, and the checkpoint's `LoadPlan` attached
as `model.deferred_load`. The trainer freezes it as usual, then `parallelize_and_load` applies
`parallelize` (FSDP2 shards meta parameters into meta DTensors), materializes every rank's shards
with `to_empty` and fills them with `hf.load_sharded`: each parameter's local rows, read as a slice of
the memory-mapped safetensors file. Peak host memory per rank is then about its shard plus one tensor
(benchmarks/bench_loading.py; numbers in docs/training.md) instead of the whole fp32 model.

Tensors the forward never uses (`model.carried`: vision layers after the selected one, CLIP's
post_layernorm) are kept by rank 0 only: the export, written by rank 0, is their only reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..model.hf import LoadPlan, load_sharded
from .distributed import parallelize


@dataclass
class DeferredLoad:
    """What a meta-built model still has to read: the plan, and the rows each grown parameter had."""

    plan: LoadPlan
    grown: dict[str, int] = field(default_factory=dict)


def meta_model(plan: LoadPlan, cls, backends, vocab_size: int):
    """`cls(plan.config)` on the meta device, the vocabulary grown to hold `vocab_size` tokens (as
    `resize_token_embeddings` grows a loaded model), with `deferred_load` set for `parallelize_and_load`."""
    model = plan.build(cls, backends)
    rows = model.config.text.vocab_size
    if model.resize_token_embeddings(vocab_size) != rows:
        grown = ["language_model.embed_tokens.weight"]
        if not model.config.text.tie_word_embeddings:
            grown.append("lm_head.weight")
        model.deferred_load = DeferredLoad(plan, {name: rows for name in grown})
    else:
        model.deferred_load = DeferredLoad(plan)
    return model


def parallelize_and_load(model: nn.Module, cfg, device: torch.device, *, stage: str) -> nn.Module:
    """`parallelize(model, cfg, device, stage=stage)`; for a model from `meta_model`, then materialize this
    rank's shards on `device` and read them from the checkpoint. Collective: every rank calls it."""
    deferred: DeferredLoad | None = model.__dict__.pop("deferred_load", None)
    if deferred is None:
        return parallelize(model, cfg, device, stage=stage)
    parallelize(model, cfg, device, stage=stage)  # shards the meta parameters; nothing is allocated yet
    model.to_empty(device=device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    load_sharded(model, deferred.plan, grown=deferred.grown, keep_carried=rank == 0)
    return model
