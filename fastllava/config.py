"""Typed training configuration: dataclasses per component, YAML files, `key=value` overrides.

A run is described by one `Config` (model source, data, optimizer, schedule, parallelism, checkpoints,
logging). It is read from a YAML file whose top-level keys are the sections below, then patched by
command-line overrides such as `optim.lr=2e-5 train.max_steps=10`. Every value is checked against its
field's type; a wrong key or value raises ValueError naming the key, what was given and what is allowed.

The MODEL architecture (hidden sizes, layers, backends' meaning) lives in fastllava/model/config.py;
here `model.architecture` only carries its fields as a nested dict for from-scratch models.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .model.config import PROJECTOR_PATTERN

Stage = Literal["align", "finetune"]
Backend = Literal["auto", "torch", "triton"]


@dataclass
class ModelConfig:
    """Where the weights come from.

    source:
      scratch     random init from `architecture` (LlavaConfig fields as a nested dict) and `init_seed`;
      components  CLIP vision tower `vision_path` + LLaMA-family LLM `llm_path` + a new projector
                  (stage 1), or the stage-1 projector `projector_weights` (stage 2);
      pretrained  a llava-hf directory `pretrained_path` (e.g. to continue a finetune).
    """

    source: Literal["scratch", "components", "pretrained"] = "components"
    architecture: Optional[dict] = None
    init_seed: int = 0
    vision_path: Optional[str] = None
    llm_path: Optional[str] = None
    pretrained_path: Optional[str] = None
    projector_type: str = "mlp2x_gelu"
    projector_weights: Optional[str] = None
    vision_feature_layer: int = -2
    # source=scratch only: CLIP-style contrastive pretraining of the new vision tower on image-caption pairs
    # before LLaVA training (fastllava/train/contrastive.py), standing in for the pretrained CLIP that the
    # paper starts from. 0 = off. Captions: vision_pretrain_data (LLaVA format), else the synthetic
    # demo's own caption file.
    vision_pretrain_steps: int = 0
    vision_pretrain_batch: int = 128
    vision_pretrain_lr: float = 2e-3
    vision_pretrain_data: Optional[str] = None
    # Tokenizer directory; defaults to llm_path / pretrained_path. The scratch demo builds one in code.
    tokenizer_path: Optional[str] = None
    attention_backend: Backend = "auto"
    projector_backend: Backend = "auto"
    merge_backend: Backend = "auto"
    loss_backend: Backend = "auto"

    def __post_init__(self):
        needs = {
            "scratch": ("architecture",),
            "components": ("vision_path", "llm_path"),
            "pretrained": ("pretrained_path",),
        }[self.source]
        missing = [f"model.{k}" for k in needs if getattr(self, k) is None]
        if missing:
            raise ValueError(f"model.source={self.source!r} needs {', '.join(missing)} to be set")
        if self.vision_pretrain_steps < 0 or self.vision_pretrain_batch < 2 or self.vision_pretrain_lr <= 0:
            raise ValueError(f"model.vision_pretrain_*: need steps >= 0, batch >= 2 and lr > 0; got steps="
                             f"{self.vision_pretrain_steps}, batch={self.vision_pretrain_batch}, lr={self.vision_pretrain_lr}")
        if self.vision_pretrain_steps and self.source != "scratch":
            raise ValueError(f"model.vision_pretrain_steps={self.vision_pretrain_steps} pretrains a vision tower made "
                             f"from scratch; model.source={self.source!r} already brings a trained one")
        if not PROJECTOR_PATTERN.match(self.projector_type):
            raise ValueError(f"model.projector_type: {self.projector_type!r} is not one of 'linear', 'mlp2x_gelu', 'mlpNx_gelu'")


@dataclass
class DataConfig:
    """The dataset and how it is packed. `kind: synthetic` generates the demo dataset into `cache_dir`."""

    kind: Literal["llava", "synthetic"] = "llava"
    data_path: Optional[str] = None  # LLaVA-format JSON
    image_folder: Optional[str] = None
    cache_dir: str = ".cache/fastllava"  # where `synthetic` writes its images, JSON and tokenizer
    synthetic_size: int = 2000  # training samples of the synthetic set
    template: Literal["plain", "vicuna_v1"] = "plain"
    image_mode: Literal["square", "pad"] = "square"
    model_max_length: int = 2048
    overlong: Literal["truncate", "reject"] = "truncate"  # samples over model_max_length
    strict: bool = False
    rejects_path: Optional[str] = None
    # Token budget of one micro-step pack on one rank (after image expansion). The global batch (in
    # samples) is split into ranks x micro-steps of at most this many tokens: gradient accumulation.
    max_tokens_per_pack: int = 8192
    num_workers: int = 2
    image_backend: Literal["auto", "pil", "dali"] = "auto"

    def __post_init__(self):
        if self.kind == "llava" and (self.data_path is None or self.image_folder is None):
            raise ValueError("data.kind='llava' needs data.data_path (LLaVA JSON) and data.image_folder")
        _positive("data.model_max_length", self.model_max_length)
        _positive("data.max_tokens_per_pack", self.max_tokens_per_pack)
        _positive("data.synthetic_size", self.synthetic_size)
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_tokens_per_pack < self.model_max_length:
            raise ValueError(
                f"data.max_tokens_per_pack ({self.max_tokens_per_pack}) must be >= data.model_max_length "
                f"({self.model_max_length}) so that the longest sample fits in one pack"
            )


@dataclass
class OptimConfig:
    """AdamW + schedule. No weight decay on biases and norms (the reference's parameter groups)."""

    lr: float = 2e-5
    projector_lr: Optional[float] = None  # None: same as lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        if self.projector_lr is not None:
            _positive("optim.projector_lr", self.projector_lr)
        for name in ("weight_decay", "max_grad_norm", "eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must both be in [0, 1), got {self.betas}")


@dataclass
class TrainConfig:
    """What is trained and for how long. One optimizer step = `global_batch_size` samples (the paper's)."""

    stage: Stage = "finetune"
    unfreeze_vision: bool = False  # stage 2 only, as later LLaVA versions do
    global_batch_size: int = 128
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (the schedule then spans them)
    schedule_steps: Optional[int] = None  # schedule length if not the run's length (e.g. to stop mid-schedule)
    seed: int = 0
    output_dir: str = "outputs/run"
    device: Literal["auto", "cuda", "cpu"] = "auto"

    def __post_init__(self):
        _positive("train.global_batch_size", self.global_batch_size)
        _positive("train.epochs", self.epochs)
        if self.max_steps is not None:
            _positive("train.max_steps", self.max_steps)
        if self.schedule_steps is not None:
            _positive("train.schedule_steps", self.schedule_steps)
        if self.stage == "align" and self.unfreeze_vision:
            raise ValueError("train.unfreeze_vision=true is a stage-2 option; stage 'align' trains only the projector")


@dataclass
class ParallelConfig:
    """FSDP2 and memory/speed switches. All of it is configuration, none needs code edits."""

    activation_checkpointing: Literal["none", "full", "selective"] = "selective"
    compile: bool = False  # torch.compile each decoder block
    # bf16 parameters with fp32 gradient reduction on GPU; fp32 everywhere on CPU.
    param_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    reshard_after_forward: bool = True
    # Stage 1 only: the frozen LLM sharded like the rest, or replicated on every rank (no all-gathers
    # at all for it, at the price of a full bf16 copy per GPU). Which is faster is to be measured.
    frozen_llm: Literal["shard", "replicate"] = "shard"


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <train.output_dir>/checkpoints
    every_steps: int = 500  # 0: only on a stop signal (SIGTERM/SIGINT) and never periodically
    resume: str = "auto"  # "auto": newest complete checkpoint if any; "none"; or a checkpoint path
    keep_last: int = 2  # 0 keeps all
    save_final: bool = False  # also write a resumable checkpoint at the end

    def __post_init__(self):
        if self.every_steps < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.every_steps and checkpoint.keep_last must be >= 0")


@dataclass
class LoggingConfig:
    progress: bool = True  # tqdm bar on rank 0
    log_every: int = 1  # steps between TensorBoard / W&B / plain-text records
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "fastllava"
    run_name: Optional[str] = None
    peak_tflops: Optional[float] = None  # override the device peak table (dense bf16 TFLOP/s)

    def __post_init__(self):
        _positive("logging.log_every", self.log_every)


@dataclass
class EvalConfig:
    """Held-out evaluation after training (the synthetic demo's question-type accuracy)."""

    enabled: bool = False
    max_samples: Optional[int] = None
    max_new_tokens: int = 16


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.train.output_dir) / "checkpoints"


def _positive(key: str, value) -> None:
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value}")


# ---------------------------------------------------------------------------------------------
# Building a Config from plain data, with type checks.


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"{key}: {value!r} is not allowed; choose one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads "1e-3" (no dot) as a string; a float field takes it.
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise AssertionError(f"config field {key} has an unsupported annotation {tp}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ValueError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; allowed: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for k, v in patch.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=2e-5' -> (['optim', 'lr'], 2e-05). The value is read as YAML (numbers, true/false, null, lists)."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected section.key=value, e.g. optim.lr=2e-5")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ValueError(f"override {text!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: cannot read the value: {e}") from None
    return path, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (optional), apply `key=value` overrides, validate everything."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of sections at the top level")
        data = _resolve_base(data, path.parent)
    for text in overrides:
        keys, value = parse_override(text)
        patch: dict = value
        for k in reversed(keys):
            patch = {k: patch}
        data = _merge(data, patch)
    try:
        return _build(Config, data, "")
    except ValueError as e:
        where = f" (in {path}{' or the command-line overrides' if overrides else ''})" if path is not None else ""
        raise ValueError(f"{e}{where}") from None


def _resolve_base(data: dict, folder: Path) -> dict:
    """A file may start from another: `base: other.yaml` (relative to the file), then patch it."""
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = folder / base
    if not base_path.is_file():
        raise ValueError(f"base config {base_path} does not exist")
    with open(base_path) as f:
        parent = yaml.safe_load(f) or {}
    return _merge(_resolve_base(parent, base_path.parent), data)


def parse_args(argv: list[str], default_config: str | Path | None = None) -> Config:
    """Command line of the recipes: `[--config FILE] [section.key=value ...]`."""
    config_path = default_config
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            sections = ", ".join(f.name for f in dataclasses.fields(Config))
            raise SystemExit(f"usage: [--config FILE.yaml] [section.key=value ...]; sections: {sections}")
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a file name")
            config_path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ValueError(f"unknown flag {arg!r}; use --config FILE and section.key=value overrides")
        else:
            overrides.append(arg)
        i += 1
    return load_config(config_path, overrides)
