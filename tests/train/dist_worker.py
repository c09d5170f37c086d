"""Run by test_train_distributed.py under torchrun (and in-process for one rank): a short stage-2 run,
a short stage-1 run with the frozen LLM replicated and a short LoRA run; rank 0 saves losses and full
parameters.

`dist_worker.py OUT hsdp` runs the same two under HSDP (parallel.replicate=2), the stage-2 run in two
micro-steps per rank and writing a checkpoint at step 2, then a third run that resumes from it and does step 3.

`dist_worker.py OUT sharded [MODULE]` loads the checkpoints test_sharded_load.py (or the test module MODULE,
by its `layouts`) wrote under OUT/ckpt both ways (`run_sharded` launches it on 2 gloo processes),
whole then sharded by FSDP (build_model meta=False) and built on the meta device with each rank reading
its shard (meta=True), compares every rank's shards, trains 2 steps each way, and records the errors of
broken checkpoints through the sharded path; every rank saves its results."""

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from train_tiny import ToyDataset, run, tiny_config, tiny_model  # noqa: E402

RUNS = {
    "finetune": ["train.max_steps=3", "checkpoint.every_steps=3"],
    "align": ["train.stage=align", "train.max_steps=2", "parallel.frozen_llm=replicate", "optim.lr=0.05"],
    "lora": ["lora.rank=4", "lora.alpha=8", "lora.dropout=0", "optim.lr=0.02", "train.max_steps=2"],
}


def hsdp_runs(out: Path) -> dict:
    """RUNS with parallel.replicate=2, plus "resumed": step 3 of "finetune" from its step-2 checkpoint.
    Checkpoint frequency changes nothing in the losses, so "finetune" still equals RUNS' one-process run."""
    step2 = out / "finetune" / "checkpoints" / "step_00000002"
    # Packs of 32 tokens: two micro-steps per rank, so the cross-replica all-reduce deferred to the last
    # micro-step (trainer.train_step) is exercised. Samples are at most 31 tokens: nothing is truncated.
    two_micro = ["parallel.replicate=2", "data.max_tokens_per_pack=32", "data.model_max_length=32"]
    return {
        "finetune": [*two_micro, "train.max_steps=3", "checkpoint.every_steps=2"],
        "resumed": [*two_micro, "train.max_steps=3", f"checkpoint.resume={step2}"],
        "align": ["parallel.replicate=2", *RUNS["align"]],
    }


def _layout(model) -> tuple:
    """(mesh shape, dim names, placements) of a projector parameter: the projector is sharded in both stages."""
    p = next(model.projector.parameters())
    return (tuple(p.device_mesh.shape), p.device_mesh.mesh_dim_names, tuple(p.placements))


def run_all(out: Path, runs: dict | None = None) -> dict:
    results = {}
    for name, overrides in (runs or RUNS).items():
        cfg = tiny_config(out / name, "train.global_batch_size=8", *overrides)
        r = run(cfg, tiny_model(), ToyDataset(40))
        full = get_model_state_dict(r.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        results[name] = {"losses": r.losses, "grad_norms": r.grad_norms, "params": {k: v.clone() for k, v in full.items()},
                         "export": str(r.export), "checkpoint": str(r.checkpoint), "mesh": _layout(r.model)}
    return results


def run_sharded(out: Path, module: str) -> list[dict]:
    """`dist_worker.py OUT sharded MODULE` under torchrun on 2 gloo processes, after MODULE's write_checkpoints
    wrote OUT/ckpt: each rank's results (sharded_all's)."""
    import os
    import subprocess

    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here.parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(here / "dist_worker.py"), str(out), "sharded", module],
        env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"results_{r}.pt", weights_only=False) for r in range(2)]


def sharded_all(out: Path, layouts) -> dict:
    """Per layout of `layouts(root)` (name -> config overrides): the names whose local shard differs from the
    full load's slice (none expected), the carried keys, and both paths' losses; per broken checkpoint, the
    sharded path's error message."""
    import torch.distributed as dist

    from fastllava.data.tokenize import TokenizerIds
    from fastllava.train.build import build_model
    from fastllava.train.distributed import init_distributed
    from fastllava.train.freeze import set_trainable
    from fastllava.train.sharded_load import local_part, parallelize_and_load

    env = init_distributed("cpu")
    ids = TokenizerIds(image_token_id=299, pad_token_id=0, vocab_size=310)  # 300 rows grow to 320
    results = {"rank": env.rank, "layouts": {}, "errors": {}}
    for name, overrides in layouts(out / "ckpt").items():
        cfg = tiny_config(out / name, *overrides, "train.max_steps=2")
        full = build_model(cfg, ids, meta=False)
        full_params = dict(full.named_parameters())
        model = build_model(cfg, ids, meta=True)
        assert all(p.is_meta for p in model.parameters())
        set_trainable(model, cfg.train.stage)
        parallelize_and_load(model, cfg.parallel, env.device, stage=cfg.train.stage)
        differ, sharded = [], 0
        for n, p in model.named_parameters():
            index, local = local_part(p)
            sharded += local.numel() < p.numel()
            if not torch.equal(local, full_params[n][index].to(local.dtype)):
                differ.append(n)
            # Independent of the offsets computed above: the shards gathered back are the full tensor.
            whole = p.full_tensor() if hasattr(p, "full_tensor") else p
            if not torch.equal(whole, full_params[n].to(whole.dtype)):
                differ.append(n + " (gathered)")
        carried_equal = all(torch.equal(t, full.carried[k]) for k, t in model.carried.items())
        losses = {}
        for path, meta in (("full", False), ("sharded", True)):
            losses[path] = run(tiny_config(out / name / path, *overrides, "train.max_steps=2"),
                               build_model(cfg, ids, meta=meta), ToyDataset(24)).losses
        if name == "hf":
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            results["export_state_keys"] = bool(state)
        results["layouts"][name] = {"differ": differ, "sharded_params": sharded, "carried": sorted(model.carried),
                                    "carried_equal": carried_equal, "full_carried": sorted(full.carried),
                                    "vocab": model.config.text.vocab_size, "losses": losses,
                                    "tied": model.lm_head.weight is model.language_model.embed_tokens.weight}
    for name, overrides in layouts(out / "broken").items():
        cfg = tiny_config(out / name, *overrides)
        try:
            model = build_model(cfg, ids, meta=True)
            set_trainable(model, cfg.train.stage)
            parallelize_and_load(model, cfg.parallel, env.device, stage=cfg.train.stage)
            results["errors"][name] = None
        except ValueError as e:
            results["errors"][name] = str(e)
        dist.barrier()
    return results


if __name__ == "__main__":
    out = Path(sys.argv[1])
    import torch.distributed as dist

    if sys.argv[2:3] == ["sharded"]:
        import importlib

        results = sharded_all(out, importlib.import_module(sys.argv[3] if sys.argv[3:] else "test_sharded_load").layouts)
        torch.save(results, out / f"results_{dist.get_rank()}.pt")
    else:
        hsdp = sys.argv[2:] == ["hsdp"]
        results = run_all(out, hsdp_runs(out) if hsdp else None)
        if dist.get_rank() == 0:
            torch.save(results, out / "results.pt")
    dist.destroy_process_group()
