"""Run by test_train_distributed.py under torchrun (and in-process for one rank): a short stage-2 run
and a short stage-1 run with the frozen LLM replicated; rank 0 saves losses and full parameters."""

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


def run_all(out: Path) -> dict:
    results = {}
    for name, overrides in RUNS.items():
        cfg = tiny_config(out / name, "train.global_batch_size=8", *overrides)
        r = run(cfg, tiny_model(), ToyDataset(40))
        full = get_model_state_dict(r.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        results[name] = {"losses": r.losses, "grad_norms": r.grad_norms, "params": {k: v.clone() for k, v in full.items()},
                         "export": str(r.export), "checkpoint": str(r.checkpoint)}
    return results


if __name__ == "__main__":
    out = Path(sys.argv[1])
    results = run_all(out)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(results, out / "results.pt")
    dist.destroy_process_group()
