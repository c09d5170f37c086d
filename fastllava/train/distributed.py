"""Processes and FSDP2: the only file that knows how the model is spread over devices.

`init_distributed` always creates a process group, also for one plain `python` process (a world of
one), so a laptop run and 8 x N GPUs run the same code path. `parallelize(model, cfg)` applies, in
this order (torchtitan's order): activation checkpointing -> torch.compile per block -> fully_shard
per block and at the root. With `parallel.replicate=R > 1` the mesh is 2D (HSDP, see `device_mesh`);
every rank still reads its own data shard, so the data-parallel world, the loss and gradient scaling and
the statistics' all-reduces stay over all ranks.

A collective waits at most `parallel.timeout_s` for every rank. The loop's own collectives
(`all_reduce_sum`, `barrier`) record in the process group's store which one each rank last entered, so a
timeout raises `CollectiveTimeout` naming the op, where it was called and the ranks that did not arrive:
gloo's own error names neither ("Timed out waiting 5000ms for recv operation to complete").
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ParallelConfig
from ..layers.lora import lora_modules


@dataclass
class DistEnv:
    """This process's place in the run: rank, world size, local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that prints and writes shared files."""
        return self.rank == 0


def local_device(device: str = "auto") -> torch.device:
    """This process's device: "cuda" is the GPU of LOCAL_RANK (torchrun's; 0 for a plain process), "auto" that
    GPU when there is one, else the CPU. The one place a device name is read (training, eval, chat)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda (train.device, --device) but torch.cuda.is_available() is False; use auto or cpu")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join (or create) the default process group on `local_device(device)`: NCCL on CUDA, gloo on CPU.
    timeout_s: how long a collective waits for every rank (`parallel.timeout_s`); a process group that
    already exists keeps its own."""
    dev = local_device(device)
    use_cuda = dev.type == "cuda"
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(dev)
    else:
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks sharing a CPU must not oversubscribe it: with 2 ranks x 2 threads on 2 cores,
            # OpenMP's spin-waits made a 64-wide linear ~100x slower here (34 s vs 0.28 s per 1000 calls).
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                    store=_restart_store(timeout), device_id=dev if use_cuda else None)
        else:
            if world != 1:
                raise ValueError(f"WORLD_SIZE={world} without MASTER_ADDR: launch multi-process runs with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        _ARRIVALS.reset(timeout_s)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _restart_store(timeout: datetime.timedelta):
    """The store for init_process_group under torchrun --max-restarts, None (its env:// default) otherwise.

    torchrun shares its rendezvous store with the workers (TORCHELASTIC_USE_AGENT_STORE=True) and keeps it
    across restarts, and env:// reads the process group's keys from it without any per-attempt prefix: the
    restarted workers found the dead ones' addresses and failed ("Gloo connectFullMesh failed ... Connection
    refused", torch 2.13; pytorch#135712, #167288). On one node torchrun's restart count is the same for every
    worker and isolates the attempts; across nodes it is not (only the failed node's agent counts the restart),
    so there torchrun must give each attempt its own store: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restarts == 0:
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:
        raise ValueError("torchrun --max-restarts on several nodes: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before "
                         "torchrun on every node, or a restart cannot form the new process group (its workers would "
                         "read the failed attempt's addresses from torchrun's shared store); see docs/training.md")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"fastllava/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def destroy_distributed() -> None:
    """Tear the process group down, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _resolve_param_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    if cfg.param_dtype == "auto":
        # bf16 compute is what tensor cores are for; on CPU fp32 keeps runs exact and fast enough.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.param_dtype)


def apply_activation_checkpointing(block: nn.Module, mode: str) -> nn.Module:
    """`full`: recompute the whole block in backward. `selective`: keep the outputs of matmuls that are
    expensive to recompute (mm, attention) and recompute the cheap pointwise ops (norms, activations)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    # Recomputation must draw the forward's dropout masks again (LoRA's dropout): the RNG state is then
    # saved with each checkpoint; without dropout there is nothing random to replay.
    replay_rng = any(isinstance(m, nn.Dropout) and m.p > 0 for m in block.modules())
    if mode == "full":
        return checkpoint_wrapper(block, preserve_rng_state=replay_rng)
    save_ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten._scaled_dot_product_flash_attention.default,
                torch.ops.aten._scaled_dot_product_efficient_attention.default,
                torch.ops.fastllava.varlen_attention.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save_ops else CheckpointPolicy.PREFER_RECOMPUTE

    return checkpoint_wrapper(block, preserve_rng_state=replay_rng,
                              context_fn=lambda: create_selective_checkpoint_contexts(policy))


def _replace_blocks(layers: nn.ModuleList, fn) -> None:
    for i, block in enumerate(layers):
        layers[i] = fn(block)


def device_mesh(cfg: ParallelConfig, device: torch.device):
    """1D mesh over all ranks (FSDP), or with parallel.replicate=R > 1 the 2D mesh (R, world / R) named
    ("replicate", "shard"), which fully_shard treats as HSDP: parameters sharded over dim 1, replicated
    over dim 0. Ranks r*S .. r*S + S-1 (S = world / R) form one shard group: with torchrun's rank order
    that is one node when R is the number of nodes, so all-gathers and reduce-scatters stay on NVLink
    and only the gradient all-reduce across replicas crosses the network."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = cfg.mesh_shape(dist.get_world_size())  # ValueError naming world and R if R does not divide it
    if len(shape) == 1:
        return init_device_mesh(device.type, shape)
    return init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))


def parallelize(model: nn.Module, cfg: ParallelConfig, device: torch.device, *, stage: str,
                mesh=None) -> nn.Module:
    """Checkpointing -> compile -> fully_shard, in place. Returns the (same) model, now an FSDPModule.

    Decoder blocks are each one FSDP unit (all-gather one block at a time, overlapped with compute);
    the vision tower's blocks too; the root unit holds the rest (embeddings, projector, norm, head).
    mesh: the DeviceMesh to shard over; default `device_mesh(cfg, device)`. The memory planner passes
    one made outside its FakeTensorMode (making a mesh reads values).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh if mesh is not None else device_mesh(cfg, device)
    param_dtype = _resolve_param_dtype(cfg, device)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=getattr(torch, cfg.reduce_dtype))
    # A meta model (sharded loading) is materialized after sharding. Moving only what is elsewhere also
    # leaves fake parameters (the memory planner's, already on its device) alone: Module.to would swap
    # them, which FakeTensorMode forbids.
    tensors = (*model.parameters(), *model.buffers())
    if not tensors[0].is_meta and any(t.device != device for t in tensors):
        model.to(device)
    if lora_modules(model):
        # LoRA: the frozen base is only ever read in the compute dtype, so it is stored in it (half the
        # memory of fp32 in bf16; FSDP2 needs one dtype among the trainable parameters only).
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(param_dtype)

    decoder_layers = model.language_model.layers
    if cfg.activation_checkpointing != "none":
        # Frozen vision blocks keep no activations for backward anyway (no grad flows into them unless
        # unfrozen), so only the decoder is checkpointed, and the vision tower when it trains.
        _replace_blocks(decoder_layers, lambda b: apply_activation_checkpointing(b, cfg.activation_checkpointing))
        if any(p.requires_grad for p in model.vision_tower.parameters()):
            _replace_blocks(model.vision_tower.layers, lambda b: apply_activation_checkpointing(b, cfg.activation_checkpointing))
    if cfg.compile:
        for block in decoder_layers:
            block.compile()

    replicate_llm = stage == "align" and cfg.frozen_llm == "replicate"
    ignored: set[nn.Parameter] = set()
    if replicate_llm:
        # Every rank keeps the whole frozen LLM, cast once to the compute dtype: no all-gathers for it.
        for m in (model.language_model, model.lm_head):
            m.to(param_dtype)
            ignored.update(m.parameters())
        assert not any(p.requires_grad for p in ignored), "replicate applies to the frozen LLM of stage 1"

    decoder_blocks = list(decoder_layers)
    kw = dict(mesh=mesh, mp_policy=mp)
    for block in model.vision_tower.layers:
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **kw)
    if not replicate_llm:
        for i, block in enumerate(decoder_blocks):
            # The last block's parameters are needed again right away by backward: keep them gathered.
            reshard = cfg.reshard_after_forward and i < len(decoder_blocks) - 1
            fully_shard(block, reshard_after_forward=reshard, **kw)
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, ignored_params=ignored or None, **kw)
    return model


class CollectiveTimeout(RuntimeError):
    """A collective that some rank did not reach within parallel.timeout_s; the message names the op, where
    it was called and those ranks."""


class _Arrivals:
    """Which of the loop's collectives each rank entered last, kept in the process group's store (one small
    write per collective, a few per step): after a timeout, the ranks whose count is behind this rank's
    are the ones that did not arrive, and their record says where they were last seen."""

    PREFIX = "fastllava/arrived/"

    def __init__(self):
        self.reset(None)

    def reset(self, timeout_s: float | None) -> None:
        self.count, self.timeout_s = 0, timeout_s

    def enter(self, op: str, where: str) -> int:
        """Count and record this rank's next collective (called on every rank, in the same order)."""
        self.count += 1
        # The caller of all_reduce_sum / barrier (frames: enter, _collective, those, the caller): which of
        # the loop's collectives this is.
        frame = sys._getframe(3)
        site = f"{frame.f_code.co_qualname} ({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"
        record = f"{self.count}|{op} in {site}{', ' + where if where else ''}"
        dist.distributed_c10d._get_default_store().set(f"{self.PREFIX}{dist.get_rank()}", record)
        return self.count

    def report(self, count: int, error: Exception) -> str:
        """The message of a timed-out collective: the op, this rank, and each rank that did not arrive."""
        store, rank, world = dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size()
        own = store.get(f"{self.PREFIX}{rank}").decode().split("|", 1)[1]
        missing = []
        for r in range(world):
            key = f"{self.PREFIX}{r}"
            if not store.check([key]):  # check does not wait; get would, for the whole timeout
                missing.append(f"rank {r} (no collective entered yet)")
                continue
            n, last = store.get(key).decode().split("|", 1)
            if int(n) < count:
                missing.append(f"rank {r} (last seen in collective #{n}: {last})")
        who = "; ".join(missing) or "every rank entered it (a rank may have died or lost its connection)"
        after = f" after {self.timeout_s:g} s" if self.timeout_s else ""
        return (f"collective #{count} {own} timed out{after} on rank {rank} of {world} (parallel.timeout_s): "
                f"did not arrive: {who}. Look at what those ranks were doing (data loading, a filesystem, a "
                f"GPU); if they only needed longer, raise parallel.timeout_s. Backend error: {error}")


_ARRIVALS = _Arrivals()


def _collective(op: str, where: str, fn):
    """Run `fn` (a collective over all ranks) with its arrival recorded; a timeout becomes CollectiveTimeout."""
    count = _ARRIVALS.enter(op, where)
    try:
        return fn()
    except RuntimeError as e:
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        raise CollectiveTimeout(_ARRIVALS.report(count, e)) from e


def all_reduce_sum(values: list[float], device: torch.device, *, where: str = "") -> list[float]:
    """Sum a few scalars over ranks in one collective (fp64 so token counts stay exact). where: said in
    the message if it times out (e.g. the step)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        _collective("all_reduce_sum", where, lambda: dist.all_reduce(t))
    return t.tolist()


def barrier(*, where: str = "") -> None:
    """Wait for every rank (nothing to wait for in a world of one); where: as in all_reduce_sum."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        _collective("barrier", where, dist.barrier)


def all_gather_objects(obj, *, where: str = "") -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in a world of one. where: as in all_reduce_sum."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    objs: list = [None] * dist.get_world_size()
    _collective("all_gather_objects", where, lambda: dist.all_gather_object(objs, obj))
    return objs


def gather_interleaved(shard: list, rank: int, world: int) -> list:
    """Every rank's `shard` merged back into one list, where rank r held items r, r + world, ... (how
    evaluation splits its questions), so N processes give the list one process gives. Call on every rank."""
    if world == 1:
        return list(shard)
    shards = all_gather_objects(shard)
    merged: list = [None] * sum(len(s) for s in shards)
    for r, s in enumerate(shards):
        merged[r::world] = s
    return merged
