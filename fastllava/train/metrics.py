"""What a run shows: the progress display, optional TensorBoard / W&B, the final table and the plot.

MFU divides the useful FLOPs of fastllava/flops.py by the device peaks of fastllava/hardware.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..extras import install_command, require
from ..progress import Progress, progress

# logging.<key>=true -> the module its writer needs (fastllava/extras.py names the extra that installs it)
WRITER_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}


@dataclass
class StepRecord:
    """One optimizer step as the run reports it."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # over all ranks
    samples: int
    flops: float  # over all ranks
    seconds: float
    skipped: bool = False  # a non-finite loss or gradient norm: no update (trainer.py)
    lrs: dict[str, float] = field(default_factory=dict)  # each module's lr when it has its own (train/optim.py)

    @property
    def tokens_per_s(self) -> float:
        """Tokens of all ranks per second of the step."""
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


@dataclass
class Meter:
    """Accumulates step records; draws progress (rank 0) and gives the final summary."""

    total_steps: int
    start_step: int
    world_size: int
    peak_tflops: float | None  # per device; None where MFU means nothing (CPU, an unknown GPU)
    show_progress: bool = True
    records: list[StepRecord] = field(default_factory=list)
    _bar: Progress | None = None
    _t0: float = field(default_factory=time.perf_counter)
    _writers: list = field(default_factory=list)

    def __post_init__(self):
        self._bar = progress(self.total_steps, desc="train", unit="step", initial=self.start_step,
                             enabled=self.show_progress)

    def mfu(self, flops: float, seconds: float) -> float | None:
        """Model FLOPs utilization of all ranks, or None without a known peak."""
        if self.peak_tflops is None or seconds <= 0:
            return None
        return flops / seconds / (self.peak_tflops * 1e12 * self.world_size)

    def add_writer(self, writer) -> None:
        """Also send each logged step to `writer(step, {name: value})`."""
        self._writers.append(writer)

    def update(self, rec: StepRecord, log: bool = True) -> None:
        """Record a step, advance the progress display, and (if `log`) send it to the writers."""
        self.records.append(rec)
        mfu = self.mfu(rec.flops, rec.seconds)
        self._bar.set_postfix(f"loss {rec.loss:.4f} lr {rec.lr:.2e} gnorm {rec.grad_norm:.3f} "
                              f"tok/s {rec.tokens_per_s:,.0f} MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
        self._bar.update(1)
        if log:
            scalars = {"loss": rec.loss, "lr": rec.lr, "grad_norm": rec.grad_norm, "tokens_per_s": rec.tokens_per_s}
            if mfu is not None:
                scalars["mfu"] = mfu
            if len(rec.lrs) > 1:  # a module with its own lr: each one as lr/<module>
                scalars.update({f"lr/{name}": value for name, value in rec.lrs.items()})
            for w in self._writers:
                w(rec.step, scalars)

    def write(self, text: str) -> None:
        """Print a line without breaking the progress display."""
        self._bar.write(text)

    def close(self) -> None:
        """End the progress display."""
        self._bar.close()

    def summary(self, device: torch.device) -> dict:
        """The run's totals and means (the numbers of format_summary)."""
        train_s = sum(r.seconds for r in self.records)
        tokens = sum(r.tokens for r in self.records)
        good = [r for r in self.records if not r.skipped]
        return {
            "steps": len(self.records),
            "wall_clock_s": time.perf_counter() - self._t0,
            "train_s": train_s,
            "samples": sum(r.samples for r in self.records),
            "tokens": tokens,
            "tokens_per_s": tokens / train_s if train_s > 0 else float("nan"),
            "mfu": self.mfu(sum(r.flops for r in self.records), train_s),
            "final_loss": good[-1].loss if good else float("nan"),
            "bad_steps": len(self.records) - len(good),  # skipped, their compute counted in tokens/s and MFU
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }

    def plot(self, path: Path) -> str:
        """A PNG of loss, learning rate and tokens/s over the steps; returns a line saying where (or why not)."""
        from .plot import plot_run

        if not self.records:
            return "no step recorded: no plot"
        series = {"loss": [r.loss for r in self.records], "learning rate": [r.lr for r in self.records],
                  "tokens/s": [r.tokens_per_s for r in self.records]}
        written = plot_run(path, [r.step for r in self.records], series, title=path.parent.name)
        if written is None:
            return f"no plot: matplotlib is not installed ({install_command('matplotlib')})"
        return f"plot: {written}"


def format_summary(s: dict) -> str:
    """The summary as an aligned two-column table."""
    rows = [
        ("optimizer steps", f"{s['steps']}"),
        ("skipped (non-finite)", f"{s.get('bad_steps', 0)}"),
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


def writer_modules(cfg_logging) -> dict:
    """{key: module} for each writer `cfg_logging` turns on, imported; MissingExtra names a missing package.
    fastllava.train.main calls it before any model is built: the writers themselves start on rank 0 only,
    after the model, where a missing package would stop one rank and leave the others waiting."""
    return {key: require(module, f"logging.{key}=true") for key, module in WRITER_MODULES.items()
            if getattr(cfg_logging, key)}


def make_writers(cfg_logging, output_dir: str, config_dict: dict) -> list:
    """TensorBoard / W&B scalar writers, each a callable (step, {name: value}); rank 0 only."""
    writers = []
    modules = writer_modules(cfg_logging)
    if "tensorboard" in modules:
        tb = modules["tensorboard"].SummaryWriter(log_dir=f"{output_dir}/tensorboard")
        writers.append(lambda step, d: [tb.add_scalar(f"train/{k}", v, step) for k, v in d.items()])
    if "wandb" in modules:
        run = modules["wandb"].init(project=cfg_logging.wandb_project, name=cfg_logging.run_name, config=config_dict)
        writers.append(lambda step, d: run.log({f"train/{k}": v for k, v in d.items()}, step=step))
    return writers
