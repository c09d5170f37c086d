"""Run by test_faults_distributed.py under torchrun: a short tiny-model run into which the test injects one
fault through a Trainer subclass (test-only: nothing in the library knows about it).

`fault_worker.py OUT stall`: parallel.timeout_s=5; rank 1 sleeps STALL_S seconds before step 2's first
collective, as a rank stuck in its data loading would; the others wait in that all-reduce.

`fault_worker.py OUT die`: 5 steps, a checkpoint every 2, checkpoint.resume=auto; with KILL_AT=3 rank 1
SIGKILLs itself at the start of step 3 on torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT=0),
after the step-2 checkpoint is complete. Without KILL_AT the run is the uninterrupted reference. Rank 0
of each attempt that finishes saves OUT/results_<attempt>.pt: losses, gradient norms, full parameters,
the checkpoint it resumed from."""

import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from train_tiny import ToyDataset, tiny_config, tiny_model  # noqa: E402

from fastllava.train import Trainer  # noqa: E402

FIRST_ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


class FaultyTrainer(Trainer):
    """Trainer whose rank 1 stalls (`stall_s`) or dies (`kill`) when step `at` (1-based) begins."""

    def __init__(self, *args, at: int, stall_s: float = 0.0, kill: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.stall_s, self.kill = at, stall_s, kill

    def train_step(self, step, micro_batches, stop_requested):
        if self.env.rank == 1 and step + 1 == self.at:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node: no cleanup at all
            time.sleep(self.stall_s)
        return super().train_step(step, micro_batches, stop_requested)


def main(out: Path, mode: str) -> None:
    if mode == "stall":
        cfg = tiny_config(out / "run", "train.max_steps=3", "parallel.timeout_s=5")
        FaultyTrainer(cfg, tiny_model(), ToyDataset(40), at=2, stall_s=float(os.environ["STALL_S"])).run()
        return
    assert mode == "die", mode
    cfg = tiny_config(out / "run", "train.max_steps=5", "checkpoint.every_steps=2", "checkpoint.resume=auto")
    kill_at = int(os.environ.get("KILL_AT", 0))
    trainer = FaultyTrainer(cfg, tiny_model(), ToyDataset(40), at=kill_at, kill=bool(kill_at) and FIRST_ATTEMPT)
    r = trainer.run()
    full = get_model_state_dict(r.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if r.is_main:
        torch.save({"losses": r.losses, "grad_norms": r.grad_norms, "params": full,
                    "resumed_from": str(trainer.resumed_from)},
                   out / f"results_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    import torch.distributed as dist

    dist.destroy_process_group()
