"""Multi-rank model loading without the model on every rank: build on the meta device, shard, then read
only this rank's shard; and the other places where a whole tensor meets its FSDP2 shard.

`build_model(cfg, ids, meta=True)` (train.build) returns a Llava whose parameters are on the meta device
(no memory) with the vocabulary already grown for the tokenizer, and the checkpoint's `LoadPlan` attached
as `model.deferred_load`. The trainer freezes it as usual, then `parallelize_and_load` applies
`parallelize` (FSDP2 shards meta parameters into meta DTensors), materializes every rank's shards
with `to_empty` and fills them with `load_sharded`: each parameter's local rows, read with plain file
reads at the rows' offset in the safetensors file (model/safetensors_io.py RowReader), never mapping the
file. Peak host memory per rank is then about its shard plus one tensor (benchmarks/bench_loading.py;
numbers in docs/training.md) instead of the whole fp32 model.

Tensors the forward never uses (`model.carried`: vision layers after the selected one, CLIP's
post_layernorm) are kept by rank 0 only: the export, written by rank 0, is their only reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..layers.lora import is_adapter
from ..model.hf import (LoadPlan, check_complete, check_placeable, check_projector_complete, new_projector, owned,
                        projector_tensors)
from .distributed import parallelize

_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter name without the parts activation checkpointing and compile wrappers insert."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def local_part(param) -> tuple[tuple[slice, ...], torch.Tensor]:
    """(the index of this rank's part in the full tensor, the tensor that holds it): a DTensor's local
    shard (FSDP2 shards dim 0, uneven on the last ranks; HSDP replicates over the other mesh dim), or a
    plain parameter whole (the replicated frozen LLM of stage 1)."""
    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local = param.to_local()
        assert tuple(local.shape) == tuple(shape), (tuple(local.shape), shape)
        return tuple(slice(o, o + n) for o, n in zip(offset, shape)), local
    return tuple(slice(0, n) for n in param.shape), param


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Set a parameter from its full value: this rank's shard of it for an FSDP2 DTensor (no
    communication: every rank holds the same full tensor), all of it for a plain tensor. The copy
    function that `init_lora_` (layers/lora.py) takes, so layers/ need not know FSDP."""
    full = full.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param = param.to_local()
    param.copy_(full)


def _shape(tensor) -> tuple[int, ...]:
    return tuple(tensor.get_shape()) if hasattr(tensor, "get_shape") else tuple(tensor.shape)


@torch.no_grad()
def load_sharded(model, plan: LoadPlan, *, grown: dict[str, int] | None = None, keep_carried: bool = True,
                 carried_dtype: torch.dtype = torch.float32) -> None:
    """Fill `model` (built by plan.build, possibly grown by resize_token_embeddings, sharded by FSDP2 on
    the meta device, then materialized by `to_empty`) with this rank's part of every tensor of `plan`.

    Each parameter receives only its local rows, read from the safetensors file with plain reads of those
    rows (RowReader), so a rank's host memory holds its shard plus at most one tensor, never the model.
    Names go through the same mapping (`LoadPlan.resolved`) as the one-process loader and the same errors
    are raised (unexpected key, shape mismatch, given twice, missing tensors, projector file errors).

    grown: parameter -> the row count stored in the checkpoint, for the embedding and head that
      `resize_token_embeddings` grew: the new rows are the mean of the stored rows, computed in fp32 from
      the whole tensor exactly as the one-process path does.
    keep_carried: keep the tensors the forward never uses (model.carried, fp32 on the host as the
      one-process path keeps them); only the rank that writes the export needs them.
    """
    params = {unwrapped_name(n): p for n, p in model.named_parameters()}
    grown = grown or {}
    placed: set[str] = set()

    def place(name: str, tensor, source: str, *, again: bool = False) -> None:
        current = params.get(name)
        expected = None if current is None else (grown[name], *current.shape[1:]) if name in grown else current.shape
        check_placeable(expected, name, _shape(tensor), source, placed=name in placed and not again)
        index, local = local_part(current)
        if name in grown:
            full = tensor[:].float()
            rows = current.shape[0] - full.shape[0]
            part = torch.cat([full, full.mean(0, keepdim=True).expand(rows, -1)])[index]
        elif local.numel() == 0:
            part = None
        else:
            part = tensor[index]
        if part is not None:
            local.copy_(part)
        placed.add(name)

    for name, canonical, source, tensor in plan.resolved(True):
        if name is None:
            if keep_carried:
                model.carried[canonical] = owned(tensor[:], carried_dtype, "cpu")
        else:
            place(name, tensor, source)
    if plan.projector_file is not None:  # replaces the checkpoint's projector, if it holds one
        from_file = set()
        for name, source, tensor in projector_tensors(plan.projector_file, plan.config):
            place(name, tensor, source, again=name not in from_file)
            from_file.add(name)
        prefix = "projector."
        check_projector_complete(plan.projector_file, [n[len(prefix):] for n in params
                                                       if n.startswith(prefix) and n not in from_file], plan.config)
    elif plan.new_projector_seed is not None:
        with torch.device("meta"):
            linears = nn.ModuleList(nn.Linear(m.in_features, m.out_features) for m in model.projector.linears)
        new_projector(linears, plan.new_projector_seed, torch.float32, "cpu")
        for name, p in linears.named_parameters():
            place(f"projector.linears.{name}", p, f"new projector (seed {plan.new_projector_seed})")
    # LoRA adapters are no checkpoint's: layers/lora.py init_lora_ gives them their start.
    check_complete([n for n in params if n not in placed and not is_adapter(n)], plan.config, plan.what)


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
