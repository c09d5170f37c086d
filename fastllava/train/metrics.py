"""Throughput accounting (model FLOPs, MFU), the progress bar, optional TensorBoard / W&B, the summary.

FLOPs follow the project's throughput accounting (docs/training.md, "What you see"), per optimizer step:
  LLM matmuls   6 N per token when the LLM trains (forward 2N + activation grads 2N + weight grads 2N),
                4 N when it is frozen (stage 1: no weight-gradient GEMMs); N = non-embedding params
                incl. the LM head.
  LLM attention causal forward 2 L d sum(l_i^2); backward twice the forward (both stages need dQ/dK/dV).
  vision tower  forward only when frozen: 2 N_vit per token + non-causal attention 4 L C S^2 per image,
                S = patches (+ CLS) per image, only the layers that run, + the patch embedding
                (2 x 3 p^2 C per patch); x3 when it trains (x2 for the patch embedding: no pixel grads).
  projector     6 N_proj per visual token (trained in both stages).
Recomputation by activation checkpointing is not counted (it is not useful work). nanoGPT counts
MFU the same way (PaLM appendix B).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch

# Dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets, SXM parts); `logging.peak_tflops` overrides.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "L40S": 362.0}


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of `device`, or None where MFU is not meaningful (CPU, unknown GPU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


@dataclass
class FlopModel:
    """Per-token / per-image FLOP coefficients of one model and stage (see the module docstring)."""

    llm_per_token: float  # matmul FLOPs per LLM token, forward + backward
    llm_attn_coeff: float  # x sum(l_i^2): causal attention FLOPs, forward + backward
    vision_matmul_per_image: float  # patch embedding + encoder matmuls (x3 when the tower trains)
    vision_attn_per_image: float
    projector_per_image: float

    @classmethod
    def build(cls, config, stage: str, unfreeze_vision: bool = False) -> "FlopModel":
        t, v = config.text, config.vision
        q = t.num_attention_heads * t.head_dim
        kv = t.num_key_value_heads * t.head_dim
        per_layer = t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
        n_llm = t.num_hidden_layers * per_layer + t.vocab_size * t.hidden_size
        llm_factor = 6 if stage == "finetune" else 4
        attn = 3 * 2 * t.num_hidden_layers * q  # forward 2 L d l^2 (causal), backward 2x

        c = v.hidden_size
        vit_layers = config.num_vision_layers_run
        n_vit = vit_layers * (4 * c * c + 2 * c * v.intermediate_size)
        s = v.num_patches + 1  # CLIP runs on the CLS token too
        patch_embed = 2 * v.num_channels * v.patch_size**2 * c * v.num_patches
        vit_factor = 3 if unfreeze_vision else 1
        depth = config.projector_depth
        n_proj = c * t.hidden_size + (depth - 1) * t.hidden_size * t.hidden_size
        return cls(
            llm_per_token=llm_factor * n_llm,
            llm_attn_coeff=attn,
            # The patch embedding never needs an input gradient (pixels): x2, not x3, when it trains.
            vision_matmul_per_image=vit_factor * 2 * n_vit * s + (2 if unfreeze_vision else 1) * patch_embed,
            vision_attn_per_image=vit_factor * 4 * vit_layers * c * s * s,
            projector_per_image=6 * n_proj * config.num_image_tokens,
        )

    @property
    def per_image(self) -> float:
        return self.vision_matmul_per_image + self.vision_attn_per_image + self.projector_per_image

    def flops(self, tokens: int, sum_sq_seqlens: int, images: int) -> float:
        return self.llm_per_token * tokens + self.llm_attn_coeff * sum_sq_seqlens + self.per_image * images


def pack_stats(batch) -> tuple[int, int, int]:
    """(tokens, sum of squared sample lengths, images) of a PackedBatch, for the FLOP count."""
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    return batch.num_tokens, int((lens * lens).sum()), batch.num_images


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # over all ranks
    samples: int
    flops: float  # over all ranks
    seconds: float


@dataclass
class Meter:
    """Accumulates step records; renders the bar (rank 0) and the final summary."""

    total_steps: int
    start_step: int
    world_size: int
    peak_tflops: float | None  # per device
    show_bar: bool = True
    records: list[StepRecord] = field(default_factory=list)
    _bar: object = None
    _t0: float = field(default_factory=time.perf_counter)
    _writers: list = field(default_factory=list)

    def __post_init__(self):
        if self.show_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=self.start_step, unit="step", dynamic_ncols=True,
                             file=sys.stdout, mininterval=0.5)

    def mfu(self, flops: float, seconds: float) -> float | None:
        if self.peak_tflops is None or seconds <= 0:
            return None
        return flops / seconds / (self.peak_tflops * 1e12 * self.world_size)

    def add_writer(self, writer) -> None:
        self._writers.append(writer)

    def update(self, rec: StepRecord, log: bool = True) -> None:
        self.records.append(rec)
        tok_s = rec.tokens / rec.seconds if rec.seconds > 0 else float("nan")
        mfu = self.mfu(rec.flops, rec.seconds)
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"loss {rec.loss:.4f} lr {rec.lr:.2e} gnorm {rec.grad_norm:.3f} tok/s {tok_s:,.0f} "
                f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}", refresh=False)
            self._bar.update(1)
        if log:
            scalars = {"loss": rec.loss, "lr": rec.lr, "grad_norm": rec.grad_norm, "tokens_per_s": tok_s}
            if mfu is not None:
                scalars["mfu"] = mfu
            for w in self._writers:
                w(rec.step, scalars)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self, device: torch.device) -> dict:
        wall = time.perf_counter() - self._t0
        steps = len(self.records)
        train_s = sum(r.seconds for r in self.records)
        tokens = sum(r.tokens for r in self.records)
        flops = sum(r.flops for r in self.records)
        mfu = self.mfu(flops, train_s)
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {
            "steps": steps,
            "wall_clock_s": wall,
            "train_s": train_s,
            "samples": sum(r.samples for r in self.records),
            "tokens": tokens,
            "tokens_per_s": tokens / train_s if train_s > 0 else float("nan"),
            "mfu": mfu,
            "final_loss": self.records[-1].loss if self.records else float("nan"),
            "peak_memory_gib": peak_mem,
        }


def format_summary(s: dict) -> str:
    rows = [
        ("optimizer steps", f"{s['steps']}"),
        ("wall clock", _fmt_time(s["wall_clock_s"])),
        ("samples", f"{s['samples']:,}"),
        ("tokens", f"{s['tokens']:,}"),
        ("mean tokens/s", f"{s['tokens_per_s']:,.0f}"),
        ("MFU", "n/a (no GPU peak known)" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"),
        ("final loss", f"{s['final_loss']:.4f}"),
        ("peak memory", "n/a (CPU)" if s["peak_memory_gib"] is None else f"{s['peak_memory_gib']:.2f} GiB"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 24)
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])


def make_writers(cfg_logging, output_dir: str, config_dict: dict) -> list:
    """TensorBoard / W&B scalar writers, each a callable (step, {name: value}); rank 0 only."""
    writers = []
    if cfg_logging.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard") from e
        tb = SummaryWriter(log_dir=f"{output_dir}/tensorboard")
        writers.append(lambda step, d: [tb.add_scalar(f"train/{k}", v, step) for k, v in d.items()])
    if cfg_logging.wandb:
        try:
            import wandb
        except ImportError as e:
            raise ValueError("logging.wandb=true needs the wandb package: pip install wandb") from e
        run = wandb.init(project=cfg_logging.wandb_project, name=cfg_logging.run_name, config=config_dict)
        writers.append(lambda step, d: run.log({f"train/{k}": v for k, v in d.items()}, step=step))
    return writers
