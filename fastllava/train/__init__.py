"""Training: the loop, FSDP2 wiring, optimizer and schedule, checkpoints, metrics.

`main(argv, default_config, stage)` is what recipes/pretrain.py and recipes/finetune.py call.
"""

from __future__ import annotations

from pathlib import Path

from .loop import TrainResult, train

__all__ = ["TrainResult", "main", "train"]


def main(argv: list[str], default_config: str | Path, stage: str) -> TrainResult:
    """Parse `[--config FILE] [key=value ...]`, check the stage, train, tear the process group down."""
    from ..config import parse_args
    from .distributed import destroy_distributed

    cfg = parse_args(argv, default_config=default_config)
    if cfg.train.stage != stage:
        raise ValueError(f"this recipe runs stage {stage!r} but the config says train.stage={cfg.train.stage!r}; "
                         f"use recipes/{'pretrain' if cfg.train.stage == 'align' else 'finetune'}.py")
    try:
        return train(cfg)
    finally:
        destroy_distributed()
