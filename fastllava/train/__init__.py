"""Training: the loop, FSDP2 wiring, optimizer and schedule, checkpoints, export, metrics.

`main(argv, stage)` is what recipes/pretrain.py and recipes/finetune.py call; `train(cfg)` runs a Config.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import NoReturn

from torch.distributed.elastic.multiprocessing.errors import record

from ..config import Config, load_config, merge_config, split_args, usage
from ..data.files import StrictReject
from ..extras import MissingExtra
from ..ops.varlen_attention import require_backend
from .build import resolve_references
from .distributed import destroy_distributed
from .metrics import writer_modules
from .trainer import NoSamples, Trainer, TrainResult, train

__all__ = ["Trainer", "TrainResult", "check_stage", "main", "train"]

RECIPES = {"align": "pretrain", "finetune": "finetune"}
HELP = ("-h", "--help")


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


@record  # any other failure: its traceback in the summary torchrun prints last, not a pointer to the docs
def main(argv: list[str], stage: str, *, description: str = "", without_config=None,
         without_config_help=None) -> TrainResult | None:
    """`[--config FILE] [section.key=value ...]`: load and check the configuration, train, tear the process
    group down. Without --config, `without_config(overrides, stage)` supplies the configuration and what to
    do with the result, `(cfg, after)` (the recipes' default without a file). A configuration mistake, a
    model it names that cannot be found (train/build.py resolve_references), or a missing package that it asks
    for, exits with its message (no traceback) and status 2, as does data with no sample left to train on
    and a strict run's first reject (data.strict: file, entry, id and reason).

    --help prints every key with the value this command line would run: the file's and the overrides' over
    the defaults, or without --config `without_config_help(overrides, stage)`."""
    wants_help = any(a in HELP for a in argv)
    after = None
    try:
        config_path, overrides = split_args([a for a in argv if a not in HELP])
        if wants_help:
            print(_help(description, config_path, overrides, stage, without_config_help))
            return None
        if config_path is not None:
            cfg = load_config(config_path, overrides)
        elif without_config is not None:
            cfg, after = without_config(overrides, stage)
        else:
            raise ValueError("no --config FILE given")
        check_stage(cfg, stage)
        require_extras(cfg)
        resolve_references(cfg)  # a model that cannot be found is the configuration's mistake too
    except (ValueError, MissingExtra) as e:
        config_error(str(e))
    try:
        result = train(cfg)
        if after is not None:
            after(result)
        return result
    except NoSamples as e:
        config_error(str(e))
    except StrictReject as e:
        config_error(reject_line(e))
    finally:
        destroy_distributed()


def _help(description: str, config_path, overrides, stage: str, without_config_help) -> str:
    if config_path is not None:
        where = f"{config_path}{' and the command line' if overrides else ''} over the defaults"
        body = usage(merge_config(config_path, overrides), where)
    elif without_config_help is not None:
        body = without_config_help(overrides, stage)
    else:
        body = usage()
    return "\n\n".join(t for t in (description.strip(), body) if t)


def reject_line(e: StrictReject) -> str:
    """A strict reject's own message. One raised in a DataLoader worker comes back re-raised with the worker's
    traceback in its message (torch's ExceptionWrapper), whose last line is `...StrictReject: <message>`."""
    text = str(e)
    return text[max(text.rfind("reject (strict mode): "), 0):].strip()


def config_error(message: str) -> NoReturn:
    """Stop on a configuration mistake (or a missing package it asks for): `error: message` on stderr, exit status 2, no traceback.

    Under torchrun the message also goes to this worker's error file (TORCHELASTIC_ERROR_FILE, in the format
    of torch.distributed.elastic's ErrorHandler.record_exception): torchrun ends every failed launch with
    its ChildFailedError summary, and the summary's "traceback :" line then shows this message instead of a
    link to the elastic docs, so the message is the last thing a torchrun user reads."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        text = f"error: {message}"
        with open(error_file, "w") as f:
            json.dump({"message": {"message": text, "extraInfo": {"py_callstack": text,
                                                                   "timestamp": str(int(time.time()))}}}, f)
    destroy_distributed()
    raise SystemExit(2)
