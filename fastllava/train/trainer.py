"""The training loop of both LLaVA stages, in three parts: build (the constructor), step, finish.

One optimizer step = `train.global_batch_size` samples, spread by the planner over R ranks x M
micro-steps (packs of <= data.max_tokens_per_pack tokens). Its loss is

    sum of token cross-entropies over every label token of the step (all ranks, all micro-steps)
    / number of those label tokens,

so packed multi-rank training computes the gradient of one unpadded full batch. Each rank knows its
own M packs before the first forward, so one all-reduce of the label count precedes backward; each
micro-step backpropagates loss_sum * R / count, because FSDP2 averages (divides by R) the gradients it
reduce-scatters.

`train(cfg)` builds tokenizer, model and dataset from the configuration; `Trainer(cfg, model, dataset)`
takes them ready-made (tests, notebooks, other entry points).

A step whose loss or gradient norm is not finite (a corrupt sample, an overflow) updates nothing: no
optimizer or scheduler step, its gradients dropped, logged with the samples of the packs whose loss was
not finite. All ranks decide alike, from the global gradient norm and the all-reduced loss, at the one
host sync the step has anyway. `train.max_bad_steps` such steps in a row stop the run with a checkpoint
of the last good weights. An export is refused if any weight is not finite; an out-of-memory step
names the pack size, the checkpointing mode and the memory plan's command.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config
from ..data.loader import MicroBatch, StepLoader
from ..flops import FlopModel, pack_stats
from ..hardware import peak_tflops
from ..layers.lora import apply_lora, init_lora_
from .build import build_dataset, build_image_processor, build_model, build_tokenizer
from .checkpoint import Checkpointer, CheckpointWriteError, find_resume
from .distributed import DistEnv, all_reduce_sum, barrier, init_distributed
from .export import export
from .faults import NonFiniteError, bad_packs, check_finite, explain_oom, give_up_message
from .freeze import set_trainable, trainable_parameters
from .metrics import Meter, StepRecord, format_summary, make_writers
from .optim import build_optimizer, build_scheduler, clip_grad_norm, describe_groups, module_lrs
from .sharded_load import copy_full_, parallelize_and_load


@dataclass
class TrainResult:
    """What a run returns: per-step losses and gradient norms, the summary, and where it wrote things."""

    losses: dict[int, float] = field(default_factory=dict)  # optimizer step (1-based) -> loss
    grad_norms: dict[int, float] = field(default_factory=dict)
    bad_steps: dict[int, str] = field(default_factory=dict)  # skipped step -> what was not finite, and where
    summary: dict = field(default_factory=dict)
    interrupted: bool = False  # stopped by SIGTERM/SIGINT after saving a checkpoint
    checkpoint: Path | None = None  # the last checkpoint written
    export: Path | None = None  # projector file (stage 1) or llava-hf directory (stage 2)
    plot: Path | None = None  # loss, learning rate and tokens/s over the steps (rank 0, with matplotlib)
    is_main: bool = True  # this process is rank 0
    model: object = field(default=None, repr=False)  # the parallelized model, for callers that go on using it
    optimizer: object = field(default=None, repr=False)
    tokenizer: object = field(default=None, repr=False)


class NoSamples(ValueError):
    """The data left no sample to train on (every one rejected): the data's or the configuration's mistake,
    which the recipes report as one line (train.main)."""


def check_samples(dataset) -> None:
    """NoSamples naming the rejects by reason and their file when every sample of `dataset` was rejected by
    the time its lengths are known (a run would train on fillers alone and export an untrained model). A
    LlavaDataset says so (valid()); other sources have no rejects. Fewer samples than train.global_batch_size
    is a run of one short step per epoch, as an epoch's last step may be: its loss is still the mean over its
    label tokens."""
    valid = getattr(dataset, "valid", None)
    if valid is not None and not valid().any():
        raise NoSamples(f"no sample to train on: {dataset.describe_rejects()}")


class StopSignal:
    """SIGTERM/SIGINT set a flag that the loop checks after each optimizer step (all ranks agree through
    the step's all-reduce), then it saves and returns. A second signal interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested:  # the user insists
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: Config) -> TrainResult:
    """Run (or resume) training as configured."""
    env = init_distributed(cfg.train.device, cfg.parallel.timeout_s)
    cfg.parallel.mesh_shape(env.world_size)  # a bad parallel.replicate fails now, not after loading the model
    tokenizer, special_ids = build_tokenizer(cfg)
    model = build_model(cfg, special_ids, meta=env.world_size > 1)  # > 1: each rank reads only its shard
    dataset = build_dataset(cfg, tokenizer, model)
    return Trainer(cfg, model, dataset, tokenizer=tokenizer, env=env).run()


class Trainer:
    """A run from ready-made parts; `run()` trains (see the module docstring)."""

    def __init__(self, cfg: Config, model, dataset, *, tokenizer=None, env: DistEnv | None = None):
        """Freeze for the stage, plan the data, shard the model, build optimizer and schedule, resume.
        `model` is a Llava not yet parallelized; `dataset` has LlavaDataset's lengths() and __getitem__."""
        self.cfg, self.tokenizer = cfg, tokenizer
        self.env = env = env or init_distributed(cfg.train.device, cfg.parallel.timeout_s)
        torch.manual_seed(cfg.train.seed)
        if cfg.lora.enabled:  # before FSDP wraps the blocks: adapters shard with their block
            apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        self.counts = set_trainable(model, cfg.train.stage, cfg.train.unfreeze_vision)
        check_samples(dataset)  # every rank alike: the lengths, and so the rejects found with them, are the same
        self.loader = self._loader(model.config, dataset)
        self.run_steps = min(self.loader.total_steps, cfg.train.max_steps or self.loader.total_steps)
        self.loader.stop_step = self.run_steps
        self.model = parallelize_and_load(model, cfg.parallel, env.device, stage=cfg.train.stage)
        if cfg.lora.enabled:
            init_lora_(self.model, seed=cfg.model.init_seed, copy_full_=copy_full_)
        self.params = trainable_parameters(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.schedule_steps or self.run_steps)
        self.checkpointer = Checkpointer(cfg.checkpoint_dir(), keep_last=cfg.checkpoint.keep_last, rank=env.rank)
        self.resumed_from, self.start_step = self._resume()
        self.flop_model = FlopModel.build(model.config, cfg.train.stage, cfg.train.unfreeze_vision, lora=cfg.lora)

    def _loader(self, config, dataset) -> StepLoader:
        env, cfg = self.env, self.cfg
        # Every rank must run the vision tower and projector at every micro-step (see data/loader.py).
        filler = torch.zeros(3, config.vision.image_size, config.vision.image_size) if env.world_size > 1 else None
        return StepLoader(dataset, global_batch=cfg.train.global_batch_size, max_tokens=cfg.data.max_tokens_per_pack,
                          rank=env.rank, world_size=env.world_size, epochs=cfg.train.epochs, seed=cfg.train.seed,
                          image_token_id=config.image_token_id, num_image_tokens=config.num_image_tokens,
                          filler_image=filler, pad_token_id=config.pad_token_id or 0,
                          num_workers=cfg.data.num_workers, pin_memory=env.device.type == "cuda",
                          anyres=config.anyres)

    def _resume(self) -> tuple[Path | None, int]:
        """(the checkpoint resumed from, the step it ends) or (None, 0)."""
        self.checkpointer.clean_partial()
        barrier()
        path = find_resume(self.cfg.checkpoint_dir(), self.cfg.checkpoint.resume)
        if path is None:
            return None, 0
        state = self.checkpointer.load(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        return path, int(state["step"])

    # --- step --------------------------------------------------------------------------------------

    def train_step(self, step: int, micro_batches: list[MicroBatch],
                   stop_requested: bool) -> tuple[StepRecord, bool, str | None]:
        """One optimizer step over this rank's micro-batches; returns its record (summed over ranks), whether
        any rank asked to stop, and, for a step skipped as not finite, what was not finite and where."""
        env, t0 = self.env, time.perf_counter()
        # Global label-token count of the whole step, before any backward (one small collective).
        (global_labels,) = all_reduce_sum([sum(mb.batch.num_label_tokens() for mb in micro_batches)], env.device,
                                          where=f"step {step + 1}")
        scale = env.world_size / max(global_labels, 1.0)
        # Each pack's loss stays on the device: read once with the step's statistics, so a bad pack costs
        # no host sync per micro-step.
        pack_losses = torch.zeros(len(micro_batches), dtype=torch.float64, device=env.device)
        tokens = sum_sq = images = samples = 0
        hsdp = self.cfg.parallel.replicate > 1
        for i, mb in enumerate(micro_batches):
            if hsdp:
                # HSDP: every micro-step reduce-scatters within its shard group (sharded gradients
                # accumulate), the cross-replica all-reduce (the inter-node one) runs once, after the last.
                self.model.set_requires_all_reduce(i == len(micro_batches) - 1)
            with self._explain_oom(f"the forward/backward of micro-step {i + 1}/{len(micro_batches)} of step "
                                   f"{step + 1}", mb.batch):
                out = self.model(mb.batch.to(env.device, non_blocking=True))
                (out.loss_sum * scale).backward()
            pack_losses[i] = out.loss_sum.detach()
            t, s2, n_img = pack_stats(mb.batch)
            tokens, sum_sq, images = tokens + t, sum_sq + s2, images + n_img
            samples += mb.batch.num_samples - mb.filler
        with self._explain_oom(f"the gradient clipping of step {step + 1}"):
            grad_norm = clip_grad_norm(self.params, self.cfg.optim.max_grad_norm)  # global: the same on every rank
        # One collective for the step's statistics and the stop decision (signals may reach ranks at
        # different moments; all ranks must stop at the same step to save together). Before the update: the
        # all-reduced loss decides, with the global gradient norm, whether there is one.
        loss_total, tokens, sum_sq, images, samples, stop_votes = all_reduce_sum(
            [float(pack_losses.sum()), tokens, sum_sq, images, samples, float(stop_requested)], env.device)
        lr, lrs = self.optimizer.param_groups[0]["lr"], module_lrs(self.optimizer)  # before the schedule steps
        bad = None
        if math.isfinite(loss_total) and math.isfinite(grad_norm):
            with self._explain_oom(f"the optimizer step of step {step + 1} (AdamW's state is allocated at the first)"):
                self.optimizer.step()
            self.scheduler.step()
        else:
            bad = (f"step {step + 1}: loss {loss_total / max(global_labels, 1.0)}, gradient norm {grad_norm}: update "
                   f"skipped; {bad_packs(self.loader, env, step, pack_losses)}")
        self.optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients go too
        record = StepRecord(step + 1, loss_total / max(global_labels, 1.0), lr, grad_norm, int(tokens), int(samples),
                            self.flop_model.flops(int(tokens), int(sum_sq), int(images)), time.perf_counter() - t0,
                            skipped=bad is not None, lrs=lrs)
        return record, stop_votes > 0, bad

    def _explain_oom(self, where: str, batch=None):
        """A context in which torch.OutOfMemoryError is re-raised with oom_message's account of it."""
        return explain_oom(self.cfg, self.env, where, batch, config=self.model.config)

    def save(self, step: int, log=print) -> Path | None:
        """A resumable checkpoint of `step` (collective); returns its directory. One that cannot be written
        raises CheckpointWriteError on every rank, or with checkpoint.on_write_error=continue is logged
        (rank 0, through `log`) and gives None."""
        state = {"step": step, "scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                 "config": self.cfg.to_dict()}
        try:
            return self.checkpointer.save(step, self.model, self.optimizer, state)
        except CheckpointWriteError as e:
            if self.cfg.checkpoint.on_write_error == "stop":
                raise
            if self.env.is_main:
                log(f"warning: {e} Training goes on (checkpoint.on_write_error=continue).")
            return None

    # --- the loop ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train from the resume point to the last step, or until a stop signal; then finish(). NonFiniteError
        after train.max_bad_steps skipped steps in a row, once their checkpoint is written."""
        cfg, env = self.cfg, self.env
        result = TrainResult(is_main=env.is_main, model=self.model, optimizer=self.optimizer, tokenizer=self.tokenizer)
        meter = self._meter()
        streak: list[str] = []  # the skipped steps since the last good one
        self.model.train()
        with StopSignal() as stop:
            for step, micro_batches in self.loader:
                record, stopping, bad = self.train_step(step, micro_batches, stop.requested)
                meter.update(record, log=record.step % cfg.logging.log_every == 0)
                result.losses[record.step], result.grad_norms[record.step] = record.loss, record.grad_norm
                streak = streak + [bad] if bad else []
                if bad:
                    result.bad_steps[record.step] = bad
                    if env.is_main:
                        meter.write(f"non-finite {bad} ({len(streak)} in a row; train.max_bad_steps="
                                    f"{cfg.train.max_bad_steps})")
                give_up = len(streak) >= cfg.train.max_bad_steps
                periodic = cfg.checkpoint.every_steps and record.step % cfg.checkpoint.every_steps == 0
                final = record.step == self.run_steps and cfg.checkpoint.save_final
                if stopping or periodic or final or give_up:
                    saved = self.save(record.step, log=meter.write)
                    result.checkpoint = saved or result.checkpoint
                if stopping:
                    result.interrupted = True
                    meter.write(f"stop signal: {f'saved {saved}' if saved else 'no checkpoint written'} at step "
                                f"{record.step}; resume with checkpoint.resume=auto")
                    break
                if give_up:
                    meter.close()
                    raise NonFiniteError(give_up_message(streak, record.step, saved))
        meter.close()
        return self.finish(result, meter)

    def _meter(self) -> Meter:
        env, cfg = self.env, self.cfg
        if env.is_main:
            where = f" (resumed from {self.resumed_from})" if self.resumed_from else ""
            print(f"stage {cfg.train.stage}: {self.counts['trainable']:,} trainable / {self.counts['frozen']:,} frozen "
                  f"parameters, {env.world_size} rank(s) on {env.device.type}, steps "
                  f"{self.start_step}..{self.run_steps}{where}", flush=True)
            print(describe_groups(self.optimizer), flush=True)
        meter = Meter(total_steps=self.run_steps, start_step=self.start_step, world_size=env.world_size,
                      peak_tflops=peak_tflops(env.device, cfg.logging.peak_tflops),
                      show_progress=env.is_main and cfg.logging.progress)
        if env.is_main:
            for writer in make_writers(cfg.logging, cfg.train.output_dir, cfg.to_dict()):
                meter.add_writer(writer)
        return meter

    # --- finish ------------------------------------------------------------------------------------

    def finish(self, result: TrainResult, meter: Meter) -> TrainResult:
        """The summary table and the plot (rank 0), then the export of a run that reached its last step."""
        env, cfg = self.env, self.cfg
        result.summary = meter.summary(env.device)
        if env.is_main:
            plot = Path(cfg.train.output_dir) / "training.png"
            line = meter.plot(plot)
            result.plot = plot if line.startswith("plot:") else None
            print(format_summary(result.summary), line, sep="\n", flush=True)
        done = self.start_step + len(meter.records) >= self.run_steps
        if not result.interrupted and done:
            check_finite(self.model, env)  # an export must never hold a NaN or inf
            lora = cfg.lora if cfg.lora.enabled else None
            if lora is not None and self.model.config.projector_type != "mlp2x_gelu" and env.is_main:
                print(f"no PEFT adapter: LlavaForConditionalGeneration has no {self.model.config.projector_type} "
                      "projector; the merged weights are in final/", flush=True)
                lora = None
            result.export = export(self.model, cfg.train.stage, cfg.train.output_dir, env, self.tokenizer, lora=lora,
                                   base_model=cfg.model.pretrained_path, template=cfg.data.template,
                                   processor=build_image_processor(cfg, self.model))
            if env.is_main:
                print(f"exported {result.export}", flush=True)
        barrier()
        return result
