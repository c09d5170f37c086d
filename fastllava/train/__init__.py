"""Training: the loop, FSDP2 wiring, optimizer and schedule, checkpoints, export, metrics.

`main(argv, stage)` is what recipes/pretrain.py and recipes/finetune.py call; `train(cfg)` runs a Config.
"""

from __future__ import annotations

import sys

from ..config import Config, load_config, split_args, usage
from ..extras import MissingExtra
from ..ops.varlen_attention import require_backend
from .distributed import destroy_distributed
from .metrics import writer_modules
from .trainer import Trainer, TrainResult, train

__all__ = ["Trainer", "TrainResult", "check_stage", "main", "train"]

RECIPES = {"align": "pretrain", "finetune": "finetune"}


def check_stage(cfg: Config, stage: str) -> None:
    """A recipe runs one stage; a configuration for the other is a mistake worth a clear word."""
    if cfg.train.stage != stage:
        raise ValueError(f"this recipe runs stage {stage!r} but the config says train.stage={cfg.train.stage!r}; "
                         f"use recipes/{RECIPES[cfg.train.stage]}.py")


def require_extras(cfg: Config) -> None:
    """Import the optional packages `cfg` asks for (an attention library, TensorBoard / W&B): a missing one
    stops every rank here, before anything is built, with MissingExtra naming the key and the extra."""
    require_backend(cfg.model.backends.attention, f"model.backends.attention={cfg.model.backends.attention}")
    writer_modules(cfg.logging)


def main(argv: list[str], stage: str, *, description: str = "", without_config=None,
         without_config_help: str = "") -> TrainResult:
    """`[--config FILE] [section.key=value ...]`: load and check the configuration, train, tear the process
    group down. Without --config, `without_config(overrides, stage)` supplies the configuration and what to
    do with the result, `(cfg, after)` (the recipes' default without a file). A configuration mistake, or a
    missing package that it asks for, exits with its message (no traceback) and status 2."""
    if any(a in ("-h", "--help") for a in argv):
        print("\n\n".join(t for t in (description.strip(), usage(), without_config_help) if t))
        raise SystemExit(0)
    after = None
    try:
        config_path, overrides = split_args(argv)
        if config_path is not None:
            cfg = load_config(config_path, overrides)
        elif without_config is not None:
            cfg, after = without_config(overrides, stage)
        else:
            raise ValueError("no --config FILE given")
        check_stage(cfg, stage)
        require_extras(cfg)
    except (ValueError, MissingExtra) as e:
        print(f"error: {e}", file=sys.stderr)
        destroy_distributed()
        raise SystemExit(2) from None
    try:
        result = train(cfg)
        if after is not None:
            after(result)
        return result
    finally:
        destroy_distributed()
