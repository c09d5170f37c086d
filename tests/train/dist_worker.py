"""Run by test_train_distributed.py under torchrun (and in-process for one rank): a short stage-2 run
and a short stage-1 run with the frozen LLM replicated; rank 0 saves losses and full parameters.

`dist_worker.py OUT hsdp` runs the same two under HSDP (parallel.replicate=2), the stage-2 run writing a
checkpoint at step 2, then a third run that resumes from it and does step 3."""

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from train_tiny import ToyDataset, run, tiny_config, tiny_model  # noqa: E402

RUNS = {
    "finetune": ["train.max_steps=3", "checkpoint.every_steps=3"],
    "align": ["train.stage=align", "train.max_steps=2", "parallel.frozen_llm=replicate", "optim.lr=0.05"],
}


def hsdp_runs(out: Path) -> dict:
    """RUNS with parallel.replicate=2, plus "resumed": step 3 of "finetune" from its step-2 checkpoint.
    Checkpoint frequency changes nothing in the losses, so "finetune" still equals RUNS' one-process run."""
    step2 = out / "finetune" / "checkpoints" / "step_00000002"
    return {
        "finetune": ["parallel.replicate=2", "train.max_steps=3", "checkpoint.every_steps=2"],
        "resumed": ["parallel.replicate=2", "train.max_steps=3", f"checkpoint.resume={step2}"],
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


if __name__ == "__main__":
    out = Path(sys.argv[1])
    hsdp = sys.argv[2:] == ["hsdp"]
    results = run_all(out, hsdp_runs(out) if hsdp else None)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(results, out / "results.pt")
    dist.destroy_process_group()
