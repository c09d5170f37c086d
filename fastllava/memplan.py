"""Peak memory per rank of a recipe's optimizer step, measured without a GPU (the FLOP audit is
fastllava/flop_audit.py).

Memory (`estimate_memory`): the real `Llava` at the recipe's shape is built under FakeTensorMode (shapes,
no values), frozen by `set_trainable`, wrapped by the trainer's own `parallelize` (activation checkpointing,
FSDP2 with a bf16 MixedPrecisionPolicy) over a fake process group of `world` ranks, given the trainer's
AdamW, and run through one steady-state optimizer step under torch's FSDPMemTracker: optimizer state
already exists and gradients are already accumulated (what every micro-step after the first of every step
after the first sees), then one micro-step on a full pack of `max_tokens` tokens drawn from the stage's
length profile, then gradient clipping and the optimizer step, the two phases under separate trackers;
the larger peak and its breakdown are the table's row. `estimate_memory_scaled` runs the decoder at 4 and 8
layers and extrapolates each phase exactly to the full depth (every layer adds the same bytes).
Byte counts do not depend on the device, so the plan runs on device "cpu"; fastllava's ops run as the Triton
backends a GPU picks and contribute what their fake implementations allocate (the kernels' outputs and saved
tensors: for the fused loss, the (T, D) input gradient and the fp32 (V, D) weight gradient, never (T, V)
logits; tests/plan/test_memplan.py holds them to the tracker's figure on the kernels run in Triton's
interpreter). Its fake backward scales the fp32 weight gradient out of place, one (V, D) fp32 buffer more
than the kernel (2.0 GiB at Qwen2.5-7B's 152,064 x 3584), about what the kernel's per-chunk workspace inside
the op (a (C, V) logits chunk and a (V, D) product, ~1.7 GB there) adds and the fake leaves out.
AnyRes models (LLaVA-NeXT) run the same step on a pack of the profile's image sizes, each image its own
tiles and tokens (full_pack); with the tower trained (`unfreeze_vision`, LLaVA-NeXT's stage 2) its
gradients, AdamW state and activations count too. Not modelled: the CUDA caching allocator's
fragmentation and the CUDA context / NCCL buffers (~1-3 GiB), hence the margin.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch

from .batch import PackedBatch
from .data.profile import STAGE_PROFILES, sample_profile
from .model import Backends, Llava, LlavaConfig
from .reference import MAX_LENGTH, make_sample
from .testing import TORCH_BACKENDS

CHECKPOINTING = ("none", "selective", "full")
PACK_TOKENS = (2048, 4096, 8192, 16384)
# The order "fastest" follows: least recomputation first.
RECOMPUTE_RANK = {"none": 0, "selective": 1, "full": 2}
# The tracker's categories, in the order of the table.
CATEGORIES = (("params", ("Sharded Param", "Unsharded Param", "Buffer")), ("grads", ("Sharded Grad", "Unsharded Grad")),
              ("optim", ("OptState",)), ("activations", ("Activation", "Inputs")), ("temps", ("Temp",)),
              ("collectives", ("All Gather", "Reduce Scatter")))
GiB = 2**30
PHASES = ("micro-step", "clip+step")
# What `auto` picks on a GPU, whose fake implementations allocate and save what the Triton kernels do: the
# plan's default. The torch references are for real tensors on the CPU; their loss keeps the fp32 (T, V)
# log-probabilities for its backward and materializes more (T, V) tensors in it, which the fused kernel exists
# to avoid: charged that way, an 8192-token pack of Qwen2.5-7B (V = 152,064) peaked 13.6 GiB higher (fake
# tensors, 2 decoder layers, 8 ranks, 2026-12-06).
GPU_BACKENDS = Backends(attention="triton", projector="triton", merge="triton", loss="triton")


@dataclass
class MemEstimate:
    """The peak of one candidate configuration, bytes per rank, broken down as FSDPMemTracker does."""

    stage: str
    max_tokens: int
    checkpointing: str
    replicate: int
    peak: int
    breakdown: dict[str, int] = field(default_factory=dict)  # CATEGORIES -> bytes at the peak
    seconds: float = 0.0  # wall clock of this estimate
    phase: str = "micro-step"  # where the peak is: "micro-step" (forward/backward) or "clip+step"
    phases: tuple = ()  # (peak, breakdown) of each phase, for extrapolation
    cuda_peak: int | None = None  # torch.cuda.max_memory_allocated of the same phase (real run on a GPU)

    def fits(self, memory_gib: float, margin: float) -> bool:
        """Whether the peak leaves `margin` (a fraction) of the device's memory free."""
        return self.peak <= (1 - margin) * memory_gib * GiB


def full_pack(config: LlavaConfig, profile: str, max_tokens: int, seed: int = 0) -> PackedBatch:
    """A pack of exactly `max_tokens` tokens: samples drawn from `profile` in order while they fit, the
    remainder closed by one text sample (a full pack is the worst case a rank sees). An AnyRes config's
    images have the profile's sizes (their own token and tile counts). Host-side tensors."""
    n_img = config.num_image_tokens
    drawn = sample_profile(profile, n=max(64, 4 * max_tokens // 256), seed=seed, num_image_tokens=n_img,
                           model_max_length=min(MAX_LENGTH[config.anyres is not None], max_tokens),
                           anyres=config.anyres)
    chosen, total = [], 0
    for length, image, size in zip(*(drawn[k].tolist() for k in ("lengths", "has_image", "image_size"))):
        size = tuple(size) if image and config.anyres else None
        # make_sample keeps a whole image (and a token of text) even where the profile truncated the sample:
        # an AnyRes image alone can outgrow a small pack
        tokens = 0 if not image else n_img if size is None else config.anyres.num_tokens(size)
        length = max(length, tokens + 2) if image else length
        if total + length <= max_tokens:
            chosen.append((length, image, size))
            total += length
    if max_tokens - total >= 2:
        chosen.append((max_tokens - total, False, None))
    g = torch.Generator().manual_seed(seed)
    samples = [make_sample(config, length, image, g, size) for length, image, size in chosen]
    return PackedBatch.from_samples(samples, image_token_id=config.image_token_id, num_image_tokens=n_img,
                                    anyres=config.anyres)


@contextmanager
def fake_process_group(world: int):
    """A fake default process group of `world` ranks (this process is rank 0); collectives do nothing."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group already exists; the memory plan needs its own fake one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _from_phases(stage, tokens, checkpointing, replicate, phases, seconds, cuda_peaks=None) -> MemEstimate:
    i = max(range(len(phases)), key=lambda j: phases[j][0])
    return MemEstimate(stage, tokens, checkpointing, replicate, phases[i][0], phases[i][1], seconds,
                       PHASES[i], tuple(phases), cuda_peaks[i] if cuda_peaks else None)


def _steady_state_step(model, optimizer, pack: PackedBatch, num_labels: int, max_grad_norm: float,
                       warmup: PackedBatch | None = None, cuda_peaks: list | None = None) -> list[tuple[int, dict[str, int]]]:
    """Optimizer state and accumulated gradients first (untracked), then, under FSDPMemTracker: one
    micro-step, then clipping + the optimizer step + zero_grad. Returns (peak, breakdown) per phase, and
    appends torch.cuda.max_memory_allocated of each phase to `cuda_peaks` when given (a run on a GPU).
    The clipping is torch's clip_grad_norm_(foreach=True) as in train/optim.py, without its float(norm)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    params = [p for p in model.parameters() if p.requires_grad]
    if warmup is not None:
        # One whole untracked step first: FSDP2's lazy initialization at the first forward and the first
        # clip/step's one-off allocations (seen as a clip+step peak of ~world x the sharded gradients on the
        # first call only) are not part of a steady step.
        (model(warmup).loss_sum * 0.0).backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW creates its state lazily: the first step
    for p in params:
        p.grad = torch.zeros_like(p)  # gradients of the step's earlier micro-steps
    # Two phases, each with its own tracker: the micro-step, then clipping + optimizer step. Each phase's
    # peak is affine in the decoder depth (estimate_memory_scaled extrapolates them separately); the
    # step's peak is the larger.
    def micro_step():
        out = model(pack)
        (out.loss_sum * (1.0 / num_labels)).backward()

    def clip_and_step():
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    phases = []
    for phase in (micro_step, clip_and_step):
        if cuda_peaks is not None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tracker = FSDPMemTracker(model, optimizer)
        with tracker:
            phase()
        phases.append(_peak(tracker))
        if cuda_peaks is not None:
            torch.cuda.synchronize()
            cuda_peaks.append(torch.cuda.max_memory_allocated())
    return phases


def _peak(tracker) -> tuple[int, dict[str, int]]:
    (per_dev,) = tracker.get_tracker_snapshot("peak").values()
    return per_dev["Total"], {name: sum(per_dev.get(k, 0) for k in keys) for name, keys in CATEGORIES}


def estimate_memory(config: LlavaConfig, stage: str, max_tokens_list, checkpointing: str, *, world: int = 8,
                    replicate: int = 1, fake: bool = True, pack_fn=None, backends: Backends | None = None,
                    max_grad_norm: float = 1.0, device: str = "cpu", lora_rank: int = 0,
                    unfreeze_vision: bool = False) -> list[MemEstimate]:
    """Peak bytes per rank of `stage` with `checkpointing`, one estimate per pack size in `max_tokens_list`.
    Needs the default process group (fake_process_group). `backends`: GPU_BACKENDS when fake, TORCH_BACKENDS
    on real tensors, unless given. `fake=False` runs real tensors on `device`:
    the tests on the CPU; on a GPU (benchmarks/bench_memory.py) each estimate also gets the phase's
    torch.cuda.max_memory_allocated. With the fake process group the collectives move no data, so the
    values are garbage but every allocation is the real one of a rank of `world`. lora_rank > 0: LoRA
    fine-tuning (adapters with dropout 0.05 on every decoder linear layer, the frozen base stored in bf16).
    unfreeze_vision: the tower trains too (stage finetune; its fp32 gradients and AdamW state, its activations
    kept, and checkpointed as parallelize checkpoints it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .config import OptimConfig, ParallelConfig
    from .layers.lora import apply_lora
    from .train.distributed import device_mesh, parallelize
    from .train.freeze import set_trainable
    from .train.optim import build_optimizer

    pcfg = ParallelConfig(activation_checkpointing=checkpointing, param_dtype="bfloat16", replicate=replicate)
    device = torch.device(device)
    on_gpu = device.type == "cuda" and not fake
    pack_fn = pack_fn or (lambda t: full_pack(config, STAGE_PROFILES[stage], t))
    packs = {t: pack_fn(t).to(device) for t in max_tokens_list}  # made outside the fake mode
    labels = {t: max(p.num_label_tokens(), 1) for t, p in packs.items()}
    # The mesh outside the fake mode (init_device_mesh reads values); parallelize then uses it.
    mesh = device_mesh(pcfg, device)
    out = []
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
    start = time.perf_counter()
    with mode:
        # One model per call; each pack size gets its own tracker, which counts what exists when it starts.
        with device:
            model = Llava(config, backends or (GPU_BACKENDS if fake else TORCH_BACKENDS))
        if lora_rank:  # LLaVA's alpha = 2 r and dropout 0.05 (dropout keeps its masks and outputs for backward)
            apply_lora(model, lora_rank, 2.0 * lora_rank, dropout=0.05)
        set_trainable(model, stage, unfreeze_vision)
        parallelize(model, pcfg, device, stage=stage, mesh=mesh)
        optimizer = build_optimizer(model, OptimConfig())
        for i, t in enumerate(max_tokens_list):
            cuda_peaks = [] if on_gpu else None
            phases = _steady_state_step(model, optimizer, packs[t], labels[t], max_grad_norm,
                                        warmup=packs[t] if i == 0 else None, cuda_peaks=cuda_peaks)
            now = time.perf_counter()
            out.append(_from_phases(stage, t, checkpointing, replicate, phases, now - start, cuda_peaks))
            start = now
    return out


def estimate_memory_scaled(config: LlavaConfig, stage: str, max_tokens_list, checkpointing: str, *,
                           depths: tuple[int, int] = (4, 8), **kw) -> list[MemEstimate]:
    """estimate_memory at two decoder depths a < b, extrapolated to the config's depth L: every decoder
    layer adds the same parameters, gradients, optimizer state and saved activations, so while the peak
    falls in the same phase of the step at both depths each category is affine in the depth:
    x(L) = x(a) + (L - a) (x(b) - x(a)) / (b - a) (exact against the full depth: docs/training.md and
    tests/plan/test_memplan.py). The micro-step and the clip+step phases are tracked apart and extrapolated
    apart (the step's peak, a max of the two, is not affine). `MemEstimate.seconds` sums the runs."""
    a, b = depths
    L = config.text.num_hidden_layers
    if L <= b:
        return estimate_memory(config, stage, max_tokens_list, checkpointing, **kw)
    runs = [estimate_memory(replace(config, text=replace(config.text, num_hidden_layers=d)), stage, max_tokens_list,
                            checkpointing, **kw) for d in (a, b)]
    f = (L - a) / (b - a)
    out = []
    for ea, eb in zip(*runs):
        phases = []
        for (pa, ba), (pb, bb) in zip(ea.phases, eb.phases):
            phases.append((round(pa + f * (pb - pa)), {k: round(ba[k] + f * (bb[k] - ba[k])) for k in ba}))
        out.append(_from_phases(stage, ea.max_tokens, checkpointing, ea.replicate, phases, ea.seconds + eb.seconds))
    return out


def choose(estimates: list[MemEstimate], memory_gib: float, margin: float) -> MemEstimate | None:
    """The fastest estimate that fits: least recomputation first, then the largest pack."""
    fitting = [e for e in estimates if e.fits(memory_gib, margin)]
    return min(fitting, key=lambda e: (RECOMPUTE_RANK[e.checkpointing], -e.max_tokens), default=None)


def format_memory_table(estimates: list[MemEstimate], memory_gib: float, margin: float) -> str:
    """Markdown: one row per candidate, GiB per rank, whether it fits under the margin."""
    header = ("| stage | pack tokens | checkpointing | params | grads | optim | activations | temps | collectives "
              "| peak GiB | peak in | fits |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in estimates:
        cells = " | ".join(f"{e.breakdown[k] / GiB:.2f}" for k, _ in CATEGORIES)
        rows.append(f"| {e.stage} | {e.max_tokens} | {e.checkpointing} | {cells} | {e.peak / GiB:.2f} | {e.phase} "
                    f"| {'yes' if e.fits(memory_gib, margin) else 'no'} |")
    return "\n".join(rows)


def memory_plan(config: LlavaConfig, *, world: int, memory_gib: float, margin: float = 0.10,
                stages=("align", "finetune"), pack_tokens=PACK_TOKENS, checkpointing=CHECKPOINTING,
                replicate: int = 1, full_depth: bool = False, lora_rank: int = 0, unfreeze_vision=(),
                others: dict[str, float] | None = None) -> tuple[str, dict[str, MemEstimate | None]]:
    """Every candidate of every stage; returns the report (tables + choices) and the choice per stage.
    `others` ({name: GiB}): further devices to name a choice for from the same estimates (the peak per
    rank depends on the world size, not on the device). unfreeze_vision: the stages whose tower trains."""
    lines, chosen = [], {}
    run = estimate_memory if full_depth else estimate_memory_scaled

    def named(best):
        return (f"data.max_tokens_per_pack={best.max_tokens}, parallel.activation_checkpointing={best.checkpointing} "
                f"({best.peak / GiB:.1f} GiB)" if best else "none fits")

    with fake_process_group(world):
        for stage in stages:
            start = time.perf_counter()
            estimates = [e for mode in checkpointing
                         for e in run(config, stage, list(pack_tokens), mode, world=world, replicate=replicate,
                                      lora_rank=lora_rank, unfreeze_vision=stage in unfreeze_vision)]
            best = chosen[stage] = choose(estimates, memory_gib, margin)
            lines += [f"stage {stage}: peak GiB per rank, {world} ranks"
                      + (f" (HSDP, {replicate} replicas)" if replicate > 1 else "")
                      + (f", LoRA rank {lora_rank}" if lora_rank else "")
                      + (", vision tower trained" if stage in unfreeze_vision else "")
                      + f", {time.perf_counter() - start:.0f} s", "", format_memory_table(estimates, memory_gib, margin), "",
                      f"fastest that fits {memory_gib:g} GiB with a {100 * margin:.0f}% margin: {named(best)}"]
            for name, gib in (others or {}).items():
                lines.append(f"  {name} ({gib:g} GiB): {named(choose(estimates, gib, margin))}")
            lines.append("")
    return "\n".join(lines), chosen
