"""The training loop of both LLaVA stages, top to bottom.

One optimizer step = `train.global_batch_size` samples, spread by the planner over R ranks x M
micro-steps (packs of <= data.max_tokens_per_pack tokens). Its loss is

    sum of token cross-entropies over every label token of the step (all ranks, all micro-steps)
    / number of those label tokens,

so packed multi-rank training computes the gradient of one unpadded full batch. Each rank knows its
own M packs before the first forward, so one all-reduce of the label count precedes backward; each
micro-step backpropagates loss_sum * R / count, because FSDP2 averages (divides by R) the gradients it
reduce-scatters.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config
from ..data.loader import StepLoader
from .checkpoint import Checkpointer, find_resume
from .distributed import DistEnv, all_reduce_sum, barrier, init_distributed, parallelize
from .freeze import set_trainable, trainable_parameters
from .metrics import FlopModel, Meter, StepRecord, device_peak_tflops, format_summary, make_writers, pack_stats
from .optim import build_optimizer, build_scheduler, clip_grad_norm


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # optimizer step (1-based) -> loss
    grad_norms: dict[int, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    interrupted: bool = False  # stopped by SIGTERM/SIGINT after saving a checkpoint
    checkpoint: Path | None = None  # the last checkpoint written
    export: Path | None = None  # projector file (stage 1) or llava-hf directory (stage 2)
    eval: dict | None = None
    model: object = field(default=None, repr=False)  # the parallelized model, for callers that go on using it
    optimizer: object = field(default=None, repr=False)


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


def train(cfg: Config, *, model=None, dataset=None, tokenizer=None, env: DistEnv | None = None) -> TrainResult:
    """Run (or resume) training as configured. `model` / `dataset` / `tokenizer` replace what the config
    would build (tests use this); the model must be Llava-shaped and not yet parallelized."""
    from . import build

    env = env or init_distributed(cfg.train.device)
    torch.manual_seed(cfg.train.seed)

    # --- build: data, model, stage, FSDP, optimizer -------------------------------------------------
    data = None
    if dataset is None or model is None:
        data = build.resolve_data(cfg, env)
        if tokenizer is None:
            tokenizer, ids = build.build_tokenizer(cfg, data["tokenizer"])
        else:
            from ..data.tokenize import prepare_tokenizer
            ids = prepare_tokenizer(tokenizer)
        if model is None:
            model = build.build_model(cfg, ids)
            if cfg.model.vision_pretrain_steps:
                from .contrastive import load_or_pretrain_tower
                load_or_pretrain_tower(cfg, model, data, tokenizer, env)
        if dataset is None:
            dataset = build.build_dataset(cfg, data, tokenizer, model.config)
    mcfg = model.config
    counts = set_trainable(model, cfg.train.stage, cfg.train.unfreeze_vision)
    filler = None
    if env.world_size > 1:
        # Every rank must run the vision tower and projector at every micro-step (see data/loader.py).
        filler = torch.zeros(3, mcfg.vision.image_size, mcfg.vision.image_size)
    loader = StepLoader(dataset, global_batch=cfg.train.global_batch_size, max_tokens=cfg.data.max_tokens_per_pack,
                        rank=env.rank, world_size=env.world_size, epochs=cfg.train.epochs, seed=cfg.train.seed,
                        image_token_id=mcfg.image_token_id, num_image_tokens=mcfg.num_image_tokens,
                        filler_image=filler, pad_token_id=mcfg.pad_token_id or 0,
                        num_workers=cfg.data.num_workers, pin_memory=env.device.type == "cuda")
    run_steps = min(loader.total_steps, cfg.train.max_steps or loader.total_steps)
    schedule_steps = cfg.train.schedule_steps or run_steps
    loader.stop_step = run_steps

    model = parallelize(model, cfg.parallel, env.device, stage=cfg.train.stage)
    params = trainable_parameters(model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, schedule_steps)

    # --- resume -------------------------------------------------------------------------------------
    ckpt = Checkpointer(cfg.checkpoint_dir(), keep_last=cfg.checkpoint.keep_last, rank=env.rank)
    ckpt.clean_partial()
    barrier()
    start_step = 0
    resume_from = find_resume(cfg.checkpoint_dir(), cfg.checkpoint.resume)
    if resume_from is not None:
        state = ckpt.load(resume_from, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        start_step = int(state["step"])
    result = TrainResult(model=model, optimizer=optimizer)

    # --- the loop -----------------------------------------------------------------------------------
    flop_model = FlopModel.build(mcfg, cfg.train.stage, cfg.train.unfreeze_vision)
    if env.is_main:
        where = f" (resumed from {resume_from})" if resume_from else ""
        print(f"stage {cfg.train.stage}: {counts['trainable']:,} trainable / {counts['frozen']:,} frozen "
              f"parameters, {env.world_size} rank(s) on {env.device.type}, steps {start_step}..{run_steps}{where}",
              flush=True)
    meter = Meter(total_steps=run_steps, start_step=start_step, world_size=env.world_size,
                  peak_tflops=device_peak_tflops(env.device, cfg.logging.peak_tflops),
                  show_bar=env.is_main and cfg.logging.progress)
    if env.is_main:
        for w in make_writers(cfg.logging, cfg.train.output_dir, cfg.to_dict()):
            meter.add_writer(w)
    model.train()
    step = start_step
    with StopSignal() as stop:
        t_last = time.perf_counter()
        for step0, micro in loader:
            if step0 >= run_steps:
                break
            step = step0 + 1
            # Global label-token count of the whole step, before any backward (one small collective).
            local_labels = sum(mb.batch.num_label_tokens() for mb in micro)
            (global_labels,) = all_reduce_sum([local_labels], env.device)
            scale = env.world_size / max(global_labels, 1.0)

            loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
            tokens = sum_sq = images = samples = 0
            for mb in micro:
                batch = mb.batch.to(env.device, non_blocking=True)
                out = model(batch)
                (out.loss_sum * scale).backward()
                loss_sum += out.loss_sum.detach().double()
                t, s2, n_img = pack_stats(mb.batch)
                tokens, sum_sq, images = tokens + t, sum_sq + s2, images + n_img
                samples += mb.batch.num_samples - mb.filler

            grad_norm = clip_grad_norm(params, cfg.optim.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # One collective for the step's statistics and the stop decision (signals may reach ranks
            # at different moments; all ranks must stop at the same step to save together).
            loss_total, tokens, sum_sq, images, samples, stop_votes = all_reduce_sum(
                [float(loss_sum), tokens, sum_sq, images, samples, float(stop.requested)], env.device)
            loss = loss_total / max(global_labels, 1.0)
            now = time.perf_counter()
            meter.update(StepRecord(step, loss, lr, grad_norm, int(tokens), int(samples),
                                    flop_model.flops(int(tokens), int(sum_sq), int(images)), now - t_last),
                         log=step % cfg.logging.log_every == 0)
            t_last = now
            result.losses[step] = loss
            result.grad_norms[step] = grad_norm
            if env.is_main and not cfg.logging.progress and step % cfg.logging.log_every == 0:
                print(f"step {step}/{run_steps} loss {loss:.6f} lr {lr:.3e} grad_norm {grad_norm:.4f}", flush=True)

            stopping = stop_votes > 0
            periodic = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
            final = step == run_steps and cfg.checkpoint.save_final
            if stopping or periodic or final:
                result.checkpoint = ckpt.save(step, model, optimizer, {
                    "step": step, "scheduler": scheduler.state_dict(), "loader": loader.state_dict(),
                    "config": cfg.to_dict()})
                t_last = time.perf_counter()  # checkpoint time is not training throughput
            if stopping:
                result.interrupted = True
                meter.write(f"stop signal: saved {result.checkpoint} at step {step}; resume with checkpoint.resume=auto")
                break
    meter.close()

    # --- the end: summary, export, evaluation -------------------------------------------------------
    result.summary = meter.summary(env.device)
    if env.is_main:
        print(format_summary(result.summary), flush=True)
    if not result.interrupted and step >= run_steps and hasattr(model, "save_projector"):
        result.export = build.export(model, cfg, env, tokenizer)
        if env.is_main and result.export is not None:
            print(f"exported {result.export}", flush=True)
        if cfg.eval.enabled and data is not None and data.get("eval_json"):
            result.eval = evaluate(model, cfg, data, tokenizer, env)
    barrier()
    return result


def evaluate(model, cfg: Config, data: dict, tokenizer, env: DistEnv) -> dict:
    """Held-out VQA accuracy per question type (the synthetic demo's evaluation)."""
    from ..eval.vqa import evaluate_vqa

    model.eval()
    results = evaluate_vqa(model, data["eval_json"], data["image_folder"], tokenizer, cfg.data.template,
                           image_mode=cfg.data.image_mode, max_new_tokens=cfg.eval.max_new_tokens,
                           max_samples=cfg.eval.max_samples, device=env.device)
    model.train()
    if env.is_main:
        print(results["table"], flush=True)
    return results
