"""Typed training configuration: dataclasses per section, YAML files, `section.key=value` overrides.

A run is one `Config`: where the model comes from, the data, the optimizer, the schedule, parallelism,
checkpoints and logging. It is read from a YAML file whose top-level keys are the sections below (a file
may start from another with `base: other.yaml`), then patched by command-line overrides such as
`optim.lr=2e-5 train.max_steps=10`. OmegaConf checks every key and value against the dataclasses' types;
each dataclass's `__post_init__` checks its values, and a section's `validate()` what only a complete
configuration can show (`to_config` calls it). A wrong key or value raises ValueError naming the key,
what was given and what is allowed.

The model's own knobs (architecture, op backends) are defined once, in fastllava/model/config.py; the
`model` section embeds those dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .layers.lora import LORA_TARGETS
from .model.config import Backends, LlavaConfig
from .model.hub import check_ref, is_hub_id

# The LlavaConfig fields that neither a tower nor a decoder checkpoint holds: how the two connect.
CONNECTOR_FIELDS = ("projector_type", "vision_feature_layer", "vision_feature_select", "image_grid_pinpoints")


def _connector(fields: dict) -> dict:
    """The connector fields a run sets: image_grid_pinpoints only for an AnyRes model (set), not as None."""
    return {k: v for k, v in fields.items() if k != "image_grid_pinpoints" or v is not None}


@dataclass
class ModelConfig:
    """Where the weights come from, and which op backends run them.

    source:
      components  vision tower `vision_path` (CLIP, SigLIP) + decoder `llm_path` (LLaMA, Qwen, Mistral, Phi-3:
                  model/families/) + a new projector seeded by
                  `init_seed` (stage 1) or the stage-1 projector `projector_weights` (stage 2). From
                  `architecture` only the connector fields are read (projector_type, vision_feature_layer,
                  vision_feature_select, image_grid_pinpoints: LLaVA-NeXT's AnyRes when set, with a seeded
                  image_newline; default LLaVA-1.5's): vision and text come from the checkpoints.
      pretrained  a llava-hf or original-LLaVA directory `pretrained_path` (e.g. to continue a finetune);
                  the checkpoint fixes the architecture.
      scratch     every weight random (model/init.py, `init_seed`) from the whole `architecture`.
    The tokenizer is read from `tokenizer_path`, default `llm_path` / `pretrained_path`. image_token_id and
    pad_token_id always come from the tokenizer. Each *_path directory may be a Hugging Face Hub id instead,
    `org/name[@revision]` (model/hub.py), resolved when the model is built; `projector_weights` a file, a
    directory holding one (a stage-1 output), `org/name[@revision]` (its mm_projector.bin / .safetensors) or
    `org/name[@revision]/FILE`. A value that is neither an existing path nor written as an id is refused here.
    """

    source: Literal["components", "pretrained", "scratch"] = "components"
    vision_path: Optional[str] = None
    llm_path: Optional[str] = None
    pretrained_path: Optional[str] = None
    projector_weights: Optional[str] = None
    tokenizer_path: Optional[str] = None
    init_seed: int = 0
    architecture: Optional[LlavaConfig] = None
    backends: Backends = field(default_factory=Backends)

    def validate(self):
        """What only a complete configuration can show (the defaults alone name no source)."""
        needs = {"scratch": ("architecture",), "components": ("vision_path", "llm_path"),
                 "pretrained": ("pretrained_path",)}[self.source]
        missing = [f"model.{k}" for k in needs if getattr(self, k) is None]
        if missing:
            raise ValueError(f"model.source={self.source!r} needs {', '.join(missing)} to be set")
        for key in ("vision_path", "llm_path", "pretrained_path", "tokenizer_path", "projector_weights"):
            if getattr(self, key) is not None:
                check_ref(getattr(self, key), f"model.{key}", file=key == "projector_weights")
        if self.source == "scratch":  # its pinpoints against its tower (components: the checkpoint's, when read)
            try:
                self.architecture.anyres
            except ValueError as e:
                raise ValueError(f"model.architecture.{e}") from None
        if self.source == "pretrained" and self.architecture is not None:
            raise ValueError("model.architecture: the checkpoint at model.pretrained_path defines the architecture; "
                             "remove model.architecture")
        if self.source == "components" and self.architecture is not None:
            default = LlavaConfig()
            fixed = [f.name for f in dataclasses.fields(LlavaConfig)
                     if f.name not in CONNECTOR_FIELDS and getattr(self.architecture, f.name) != getattr(default, f.name)]
            if fixed:
                raise ValueError(f"model.architecture.{fixed[0]}: with model.source='components' the vision tower and "
                                 f"LLM come from their checkpoints and the token ids from the tokenizer; only "
                                 f"{', '.join(CONNECTOR_FIELDS)} may be set")

    def connector(self) -> dict:
        """The connector fields for `Llava.from_components` (LLaVA-1.5's unless `architecture` sets them);
        image_grid_pinpoints only when set (an AnyRes model)."""
        arch = self.architecture or LlavaConfig()
        return _connector({name: getattr(arch, name) for name in CONNECTOR_FIELDS})


@dataclass
class DataConfig:
    """The dataset (LLaVA's JSON/JSONL files and image folder) and how it is packed."""

    data_path: Optional[str] = None  # LLaVA-format JSON or JSONL
    image_folder: Optional[str] = None  # root of the entries' "image" paths; None for text-only data
    template: str = "plain"  # a conversation template of fastllava.data.templates: plain (stage 1), vicuna_v1, llama3, qwen, mistral, v0
    # "anyres": LLaVA-NeXT's tiles, for a model with image_grid_pinpoints (and only for one: train/build.py checks)
    image_mode: Literal["square", "pad", "anyres"] = "square"
    # How images become the tower's pixels (data/images.py Preprocess): None takes the preprocessor_config.json of
    # model.vision_path / model.pretrained_path, else the tower family's processor (CLIP's or SigLIP's) at its
    # image_size; or a preprocessor_config.json file, a directory holding one, or a Hub id org/name[@revision].
    # An AnyRes model tiles with a tower's processor, or a LlavaNextImageProcessor's at the model's own pinpoints.
    image_processor: Optional[str] = None
    model_max_length: int = 2048
    overlong: Literal["truncate", "reject"] = "truncate"  # samples over model_max_length
    strict: bool = False  # any rejected sample stops the run
    rejects_path: Optional[str] = None  # default: next to the data file
    # Token budget of one micro-step pack on one rank (after image expansion). The global batch (in
    # samples) is split into ranks x micro-steps of at most this many tokens: gradient accumulation.
    max_tokens_per_pack: int = 8192
    num_workers: int = 2

    def __post_init__(self):
        from .data.templates import get_template

        try:
            get_template(self.template)
        except ValueError as e:
            raise ValueError(f"data.template: {e}") from None
        _positive("data.model_max_length", self.model_max_length)
        _positive("data.max_tokens_per_pack", self.max_tokens_per_pack)
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_tokens_per_pack < self.model_max_length:
            raise ValueError(
                f"data.max_tokens_per_pack ({self.max_tokens_per_pack}) must be >= data.model_max_length "
                f"({self.model_max_length}) so that the longest sample fits in one pack"
            )

    def validate(self):
        """A named image processor is a local one or a Hub id (read once the tower's image size is known:
        train/build.py)."""
        if self.image_processor is None:
            return
        path = Path(self.image_processor)
        if path.is_file() or (path / "preprocessor_config.json").is_file() or (
                not path.exists() and is_hub_id(self.image_processor)):
            return
        raise ValueError(f"data.image_processor {self.image_processor!r}: neither a preprocessor_config.json file, "
                         "nor a directory holding one, nor a Hugging Face Hub id (org/name or org/name@revision)")


@dataclass
class OptimConfig:
    """AdamW and transformers' learning-rate schedules. No weight decay on biases and norms (the reference's
    parameter groups)."""

    lr: float = 2e-5
    projector_lr: Optional[float] = None  # None: same as lr
    # The vision tower's lr when train.unfreeze_vision (LLaVA-NeXT's stage 2: 2e-6, a tenth of lr); None: lr.
    vision_lr: Optional[float] = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # each after a linear warmup
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still reported)

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        for key in ("projector_lr", "vision_lr"):
            if getattr(self, key) is not None:
                _positive(f"optim.{key}", getattr(self, key))
        for name in ("weight_decay", "max_grad_norm", "eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must both be in [0, 1), got {self.betas}")


@dataclass
class TrainConfig:
    """What is trained and for how long. One optimizer step = `global_batch_size` samples (the paper's)."""

    stage: Literal["align", "finetune"] = "finetune"
    unfreeze_vision: bool = False  # stage 2 only, as later LLaVA versions do
    global_batch_size: int = 128
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (the schedule then spans them)
    schedule_steps: Optional[int] = None  # schedule length if not the run's length (e.g. to stop mid-schedule)
    seed: int = 0  # data order
    output_dir: str = "outputs/run"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Optimizer steps in a row with a non-finite loss or gradient norm (each one skipped: no update) after which
    # the run stops with a checkpoint of its last good weights. One bad sample spoils one step; 5 in a row,
    # each on different samples, means the data stream or the run itself is broken, and costs only 5 steps.
    max_bad_steps: int = 5

    def __post_init__(self):
        _positive("train.global_batch_size", self.global_batch_size)
        _positive("train.max_bad_steps", self.max_bad_steps)
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
    # HSDP: R > 1 shards parameters, gradients and optimizer state within groups of world / R ranks and
    # replicates them across the R groups (e.g. R = number of nodes: all-gathers stay inside a node and
    # only gradient all-reduces cross the slower inter-node network). 1: plain FSDP over all ranks.
    replicate: int = 1
    # Seconds a collective waits for every rank before the run stops with an error naming the op and the
    # ranks that did not arrive, instead of hanging until the job's wall-clock limit. Longer than NCCL's
    # own 10 min: every rank waits at a barrier while one does one-off work (a cold data setup measured
    # 305 s on a 665K-entry file, issue 23; a 13B export writes ~26 GB from rank 0).
    timeout_s: float = 1800.0

    def __post_init__(self):
        if self.replicate < 1:
            raise ValueError(f"parallel.replicate must be >= 1 (1: shard over all ranks; R > 1: HSDP with R "
                             f"replicas), got {self.replicate}")
        if not 0 < self.timeout_s < float("inf"):
            raise ValueError(f"parallel.timeout_s must be a finite number of seconds > 0 (how long a collective "
                             f"waits for every rank; default 1800), got {self.timeout_s}")

    def mesh_shape(self, world_size: int) -> tuple[int, ...]:
        """The device mesh's shape for `world_size` ranks: (world,) for FSDP, (R, world / R) for HSDP.
        The world size is only known at launch, so divisibility is checked here rather than in __post_init__."""
        if self.replicate == 1:
            return (world_size,)
        if world_size % self.replicate:
            raise ValueError(f"parallel.replicate={self.replicate} must divide the number of ranks "
                             f"(world size {world_size}): HSDP shards within world / replicate ranks; "
                             f"use a divisor of {world_size}, e.g. the number of nodes")
        return (self.replicate, world_size // self.replicate)


@dataclass
class LoRAConfig:
    """LoRA fine-tuning (stage 2): rank > 0 trains low-rank adapters on the LLM's linear layers plus the
    projector instead of the whole LLM (fastllava/layers/lora.py). The frozen base is then stored in the
    compute dtype (bf16 on GPU). LLaVA-1.5's finetune_lora.sh: rank 128, alpha 256, dropout 0.05."""

    rank: int = 0  # 0: no LoRA, the LLM trains in full
    alpha: float = 256.0  # the update is scaled by alpha / rank
    dropout: float = 0.05  # on the adapters' input
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # the decoder's linear layers

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0 turns LoRA off), got {self.rank}")
        _positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"lora.targets: {unknown or 'empty'} ; choose among {list(LORA_TARGETS)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass
class CheckpointConfig:
    """When to write resumable checkpoints, where, how many to keep, and what to resume from."""

    dir: Optional[str] = None  # default: <train.output_dir>/checkpoints
    every_steps: int = 500  # 0: only on a stop signal (SIGTERM/SIGINT) and never periodically
    resume: str = "auto"  # "auto": newest complete checkpoint if any; "none"; or a checkpoint path
    keep_last: int = 2  # 0 keeps all
    save_final: bool = False  # also write a resumable checkpoint at the end
    # A checkpoint that cannot be written (full disk, I/O error): "stop" the run with the error (exit status 1),
    # or "continue" training without it (logged); either way the previous complete checkpoint stays loadable.
    on_write_error: str = "stop"

    def __post_init__(self):
        if self.every_steps < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.every_steps and checkpoint.keep_last must be >= 0")
        if self.on_write_error not in ("stop", "continue"):
            raise ValueError(f"checkpoint.on_write_error={self.on_write_error!r}: choose stop or continue")


@dataclass
class LoggingConfig:
    """What a run shows and records besides its final summary and plot."""

    progress: bool = True  # progress bar (a terminal) or a line every few seconds (a log file), on rank 0
    log_every: int = 1  # steps between TensorBoard / W&B records
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "fastllava"
    run_name: Optional[str] = None
    peak_tflops: Optional[float] = None  # override the device's dense bf16 peak (fastllava/hardware.py)

    def __post_init__(self):
        _positive("logging.log_every", self.log_every)


@dataclass
class Config:
    """One run: every section, each with its defaults (the paper's stage-2 settings where it has one)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        # With train.unfreeze_vision a LoRA run trains the tower in full beside the LLM's adapters, as
        # LLaVA-NeXT's LoRA scripts do.
        if self.lora.enabled and self.train.stage != "finetune":
            raise ValueError(f"lora.rank={self.lora.rank}: LoRA adapts the LLM in stage 2 (train.stage=finetune); "
                             f"got train.stage={self.train.stage!r}")
        # A tower lr for a frozen tower would silently do nothing.
        if self.optim.vision_lr is not None and not self.train.unfreeze_vision:
            raise ValueError(f"optim.vision_lr={self.optim.vision_lr} sets the vision tower's learning rate, but the "
                             f"tower is frozen (train.unfreeze_vision=false): set train.unfreeze_vision=true "
                             f"(stage 2) or remove optim.vision_lr")

    def to_dict(self) -> dict:
        """Plain JSON-able data (lists for tuples), e.g. for checkpoints and experiment trackers."""
        return OmegaConf.to_container(OmegaConf.structured(self))

    def checkpoint_dir(self) -> Path:
        """checkpoint.dir, or <train.output_dir>/checkpoints."""
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.train.output_dir) / "checkpoints"


def _positive(key: str, value) -> None:
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value}")


# ---------------------------------------------------------------------------------------------
# Reading: YAML + overrides -> a typed tree (merge_config) -> validated dataclasses (to_config).


def _read_yaml(path: Path) -> DictConfig:
    """A YAML file of sections; `base: other.yaml` (relative to the file) is read first and patched."""
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    data = OmegaConf.load(path)
    if not isinstance(data, DictConfig):
        raise ValueError(f"{path}: expected a mapping of sections at the top level")
    base = data.pop("base", None)
    return data if base is None else OmegaConf.merge(_read_yaml(path.parent / base), data)


def _overrides(texts) -> DictConfig:
    for text in texts:
        key = text.split("=", 1)[0]
        if "=" not in text or not all(key.strip().split(".")):
            raise ValueError(f"override {text!r}: expected section.key=value, e.g. optim.lr=2e-5")
    return OmegaConf.from_dotlist(list(texts))


def _explain(e: OmegaConfBaseException) -> ValueError:
    """OmegaConf's error as one line that names the key and, for an unknown key, the allowed ones."""
    key = getattr(e, "full_key", None)
    if isinstance(e, ConfigKeyError) and getattr(e, "object_type", None) is not None:
        allowed = ", ".join(f.name for f in dataclasses.fields(e.object_type))
        section = key.rpartition(".")[0]
        return ValueError(f"unknown key {key} in {f'section {section!r}' if section else 'the top level'}; "
                          f"allowed: {allowed}")
    return ValueError(f"{key}: {str(e).splitlines()[0]}" if key else str(e).splitlines()[0])


def _where(path, overrides) -> str:
    if path is None:
        return ""
    return f" (in {path}{' or the command-line overrides' if overrides else ''})"


def merge_config(path: str | Path | None = None, overrides=(), schema: type = Config) -> DictConfig:
    """The YAML file (optional) patched by `section.key=value` overrides, type-checked against `schema`
    (a Config dataclass, or one that extends it) but not yet validated by its `__post_init__`s."""
    try:
        layers = [OmegaConf.structured(schema)]
        if path is not None:
            layers.append(_read_yaml(Path(path)))
        return OmegaConf.merge(*layers, _overrides(overrides))
    except OmegaConfBaseException as e:
        raise ValueError(f"{_explain(e)}{_where(path, overrides)}") from None
    except ValueError as e:
        raise ValueError(f"{e}{_where(path, overrides)}") from None


def to_config(tree: DictConfig):
    """The validated dataclasses of a merged tree (ValueError with the key and what is allowed)."""
    try:
        config = OmegaConf.to_object(tree)
    except OmegaConfBaseException as e:
        raise _explain(e) from None
    for section in dataclasses.fields(config):
        check = getattr(getattr(config, section.name), "validate", None)
        if check is not None:
            check()
    return config


def load_config(path: str | Path | None = None, overrides=(), schema: type = Config):
    """Read a YAML file (optional), apply `section.key=value` overrides, validate everything."""
    tree = merge_config(path, overrides, schema)
    try:
        return to_config(tree)
    except ValueError as e:
        raise ValueError(f"{e}{_where(path, overrides)}") from None


def usage(tree: DictConfig | dict | None = None, source: str = "defaults") -> str:
    """The command line and every key with the value a run would take, for --help: `tree` (a merged
    configuration or its plain container, `source` saying where its values come from) or the defaults.

    With model.source=components only the connector fields of model.architecture are shown: the tower's and
    the LLM's sizes come from their checkpoints, so the defaults' (ViT-L, 7B) would misstate the run."""
    shown = tree if isinstance(tree, dict) else OmegaConf.to_container(tree or OmegaConf.structured(Config))
    model = shown["model"]
    if model["source"] == "components" and model["architecture"] is not None:
        model["architecture"] = _connector({k: model["architecture"][k] for k in CONNECTOR_FIELDS})
    return (f"usage: [--config FILE.yaml] [section.key=value ...]\n\nkeys and their values ({source}):\n"
            + OmegaConf.to_yaml(shown))


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """`[--config FILE] [section.key=value ...]` -> (config file or None, overrides). --help exits."""
    config_path, overrides = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise SystemExit(usage())
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a file name")
            config_path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ValueError(f"unknown flag {arg!r}; use --config FILE and section.key=value overrides")
        else:
            overrides.append(arg)
        i += 1
    return config_path, overrides
