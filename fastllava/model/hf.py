"""Hugging Face checkpoint interop: read llava-hf, original-LLaVA, CLIP and LLaMA directories; write llava-hf,
or the original-LLaVA layout for the projectors llava-hf cannot hold (linear, mlpNx_gelu with N != 2).

Safetensors only. Loading streams: the model is built on the meta device and each tensor is read
from its shard and placed into the model one at a time, so host memory peaks near the largest tensor
(memory-mapped shards) instead of holding the model twice.

Each loader first makes a `LoadPlan` (the config and, in order, the tensor sources with their key
mappings: nothing read yet); `_load_into` places whole tensors from it (one process), `load_sharded`
places only this rank's rows of each tensor into a model that FSDP2 has sharded on the meta device
(multi-rank training, fastllava/train/sharded_load.py). Both go through the same key mapping
(`_resolve`) and raise the same errors.

Every checkpoint key is first rewritten to its *canonical* llava-hf name (the layout of
llava-hf/llava-1.5-7b-hf, which transformers 4.x and 5.x both load), then mapped to our module names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..layers.lora import is_adapter
from .config import LlavaConfig, TextConfig, VisionConfig
from .init import init_projector_, init_transformer_
from .vision import CLIPEncoderLayer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_VISION = "vision_tower.vision_model."
_LLM = "language_model.model."
_LM_HEAD = "language_model.lm_head.weight"


# --- reading files --------------------------------------------------------------------------------


def read_config(path: Path) -> dict:
    """A model directory's config.json as a dict; ValueError naming the directory when absent or invalid."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors shard files of a model directory, checked to exist."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    elif (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    else:
        found = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {found}: convert them to safetensors first)" if found else ""
        raise ValueError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    for f in files:
        if not f.is_file():
            raise ValueError(f"{f}: shard named in {INDEX_FILE} is missing")
    return files


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a directory's shards, without reading any tensor."""
    keys = []
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as shard:
            keys.extend(shard.keys())
    return keys


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class RowReader:
    """One tensor of a safetensors file, read on demand with plain file reads: `reader[a:b, ...]` reads
    only rows a..b-1 (dim 0, how FSDP shards), `get_shape()` reads nothing. Unlike the memory-mapped
    file, the bytes read are this process's own memory, freed as soon as the rows are copied, so a rank
    that reads a slice never holds the rest of the file in its resident memory."""

    def __init__(self, file: Path, entry: dict, data_start: int):
        if entry["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: dtype {entry['dtype']} is not supported")
        self.file, self.dtype, self.shape = file, _ST_DTYPES[entry["dtype"]], tuple(entry["shape"])
        self.offset = data_start + entry["data_offsets"][0]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if not self.shape:  # a scalar
            return self._read(0, 1, ())
        start, stop, step = (index[0] if index else slice(None)).indices(self.shape[0])
        if step != 1:
            raise ValueError(f"{self.file}: only contiguous row ranges are read, not step {step}")
        rows = self._read(start * _numel(self.shape[1:]), max(0, stop - start) * _numel(self.shape[1:]),
                          (max(0, stop - start), *self.shape[1:]))
        return rows[(slice(None), *index[1:])] if len(index) > 1 else rows

    def _read(self, first: int, count: int, shape) -> torch.Tensor:
        size = self.dtype.itemsize
        if count == 0:
            return torch.empty(shape, dtype=self.dtype)
        buffer = bytearray(count * size)
        with open(self.file, "rb") as f:
            f.seek(self.offset + first * size)
            if f.readinto(buffer) != len(buffer):
                raise ValueError(f"{self.file}: truncated tensor data")
        return torch.frombuffer(buffer, dtype=self.dtype).reshape(shape)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (key -> dtype, shape, data_offsets) and where its data starts."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def iter_tensors(path: Path, lazy: bool = False) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(key, file, tensor) for every tensor of a directory's shards, one tensor in memory at a time.

    lazy: yield a RowReader instead of the tensor (get_shape(), and `reader[a:b]` reads only those rows)."""
    seen: dict[str, Path] = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as shard:  # validates the file; its key order for both modes
            header, data_start = _header(f) if lazy else (None, 0)
            for key in shard.keys():
                if key in seen:
                    raise ValueError(f"{f}: key {key!r} appears again (first in {seen[key]})")
                seen[key] = f
                yield key, f, RowReader(f, header[key], data_start) if lazy else shard.get_tensor(key)


# --- key names ------------------------------------------------------------------------------------


def canonical_llava_key(key: str) -> str:
    """Any llava-hf spelling (hub layout, transformers-5 in-memory layout) -> the hub layout."""
    for prefix, repl in (
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", _LLM),
    ):
        if key.startswith(prefix):
            key = repl + key[len(prefix) :]
    if key == "lm_head.weight":
        key = _LM_HEAD
    if key.startswith("vision_tower.") and not key.startswith(_VISION):
        key = _VISION + key[len("vision_tower.") :]
    return key


def original_llava_key(key: str, config: LlavaConfig) -> str | None:
    """Original LLaVA (LlavaLlamaForCausalLM) name -> canonical llava-hf name (None: projector handled apart)."""
    if key == "lm_head.weight":
        return _LM_HEAD
    if key.startswith("model.vision_tower.vision_tower."):
        return _VISION + key[len("model.vision_tower.vision_tower.vision_model.") :]
    m = re.match(r"^(?:model\.)?mm_projector\.(?:(\d+)\.)?(weight|bias)$", key)
    if m:
        index = int(m.group(1) or 0)
        if config.projector_depth > 1 and index % 2:
            raise ValueError(f"projector key {key!r}: odd Sequential indices are the GELUs and hold no weights")
        return f"multi_modal_projector.linear_{index // 2 + 1}.{m.group(2)}"
    if key.startswith("model."):
        return _LLM + key[len("model.") :]
    return key


def to_module_name(key: str, config: LlavaConfig) -> str | None:
    """Canonical llava-hf name -> our parameter name, or None for a tensor the forward does not use.

    Raises ValueError for a key that is not part of a LLaVA checkpoint at all.
    """
    if key.startswith(_VISION):
        rest = key[len(_VISION) :]
        m = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", rest)
        if m:
            layer = int(m.group(1))
            if layer >= config.vision.num_hidden_layers:
                raise ValueError(f"{key!r}: vision layer {layer} but the config has {config.vision.num_hidden_layers}")
            return f"vision_tower.layers.{layer}.{m.group(2)}" if layer < config.num_vision_layers_run else None
        if rest.startswith(("embeddings.", "pre_layrnorm.")):
            return None if rest == "embeddings.position_ids" else "vision_tower." + rest
        if rest.startswith("post_layernorm."):
            return None
    elif key.startswith("multi_modal_projector."):
        m = re.match(r"^multi_modal_projector\.linear_(\d+)\.(weight|bias)$", key)
        if m and 1 <= int(m.group(1)) <= config.projector_depth:
            return f"projector.linears.{int(m.group(1)) - 1}.{m.group(2)}"
    elif key.startswith(_LLM):
        rest = key[len(_LLM) :]
        if re.match(r"^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$", rest):
            return None  # old LLaMA checkpoints store the RoPE table; we compute it
        return "language_model." + rest
    elif key == _LM_HEAD:
        return None if config.text.tie_word_embeddings else "lm_head.weight"
    raise ValueError(f"unexpected key {key!r}: not part of a LLaVA checkpoint with this config")


def to_checkpoint_key(name: str) -> str:
    """Our parameter name -> canonical llava-hf name (inverse of to_module_name)."""
    if name.startswith("vision_tower.layers."):
        return _VISION + "encoder.layers." + name[len("vision_tower.layers.") :]
    if name.startswith("vision_tower."):
        return _VISION + name[len("vision_tower.") :]
    m = re.match(r"^projector\.linears\.(\d+)\.(weight|bias)$", name)
    if m:
        return f"multi_modal_projector.linear_{int(m.group(1)) + 1}.{m.group(2)}"
    if name.startswith("language_model."):
        return _LLM + name[len("language_model.") :]
    if name == "lm_head.weight":
        return _LM_HEAD
    raise AssertionError(name)


# --- placing tensors into a meta-built model ------------------------------------------------------


def _owned(tensor: torch.Tensor, dtype, device) -> torch.Tensor:
    """A copy in its own memory: safetensors hands out views of the memory-mapped shard, which must not
    outlive it (a shard rewritten in place under a running job would change or fault the weights)."""
    value = tensor.to(device=device, dtype=dtype or tensor.dtype)
    return value.clone() if value.data_ptr() == tensor.data_ptr() else value


def _check_placeable(expected, name: str, shape, source: str, placed: bool) -> None:
    """The errors of placing a checkpoint tensor of `shape` as parameter `name`, whose shape the model
    expects to be `expected` (None: the model has no such parameter)."""
    if expected is None:
        raise ValueError(f"{source}: unexpected key, the model has no parameter {name!r}")
    if tuple(expected) != tuple(shape):
        raise ValueError(f"{source}: shape {tuple(shape)} but the model expects {tuple(expected)}")
    if placed:
        raise ValueError(f"{source}: {name!r} is given twice")


def _place(model: nn.Module, name: str, tensor: torch.Tensor, source: str, dtype, device) -> None:
    module_name, _, leaf = name.rpartition(".")
    try:
        current = model.get_submodule(module_name)._parameters.get(leaf)
    except AttributeError:
        current = None
    _check_placeable(None if current is None else current.shape, name, tensor.shape, source,
                     placed=current is not None and not current.is_meta)
    value = _owned(tensor, dtype, device)
    model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=current.requires_grad)


def _raise_missing(missing_names: list[str], what: str) -> None:
    missing = [to_checkpoint_key(n) for n in missing_names]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{what}: missing tensors {shown}; nothing is left randomly initialized")


def _check_complete(model: nn.Module, what: str) -> None:
    _raise_missing([n for n, p in model.named_parameters() if p.is_meta], what)


def _retie(model) -> None:
    if model.config.text.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight


def _resolve(tensors, key_map, config) -> Iterator[tuple[str | None, str, str, object]]:
    """(our parameter name or None for a carried tensor, canonical key, source for messages, tensor or
    slice handle) for every (key, file, tensor) of a source: the one key mapping of both loaders."""
    for key, file, tensor in tensors:
        canonical = key_map(key)
        yield to_module_name(canonical, config), canonical, f"{file}: key {key!r}", tensor


def _load_into(model, tensors, key_map, dtype, device) -> None:
    """Place every (key, file, tensor) into the model; keys the forward does not use are carried."""
    for name, canonical, source, tensor in _resolve(tensors, key_map, model.config):
        if name is None:
            model.carried[canonical] = _owned(tensor, dtype, device)
        else:
            _place(model, name, tensor, source, dtype, device)
    _retie(model)


# --- load plans -------------------------------------------------------------------------------------

TensorSource = Callable[[bool], Iterator[tuple[str, Path, object]]]  # lazy -> (key, file, tensor or handle)


@dataclass
class LoadPlan:
    """What a loader will read, before reading any tensor: the model's config, the tensor sources in
    order, each with its key mapping (checkpoint key -> canonical llava-hf key), then the projector (a
    file, or a new one drawn from `new_projector_seed`). `what` names the checkpoint in error messages."""

    config: LlavaConfig
    what: str
    sources: list[tuple[TensorSource, Callable[[str], str]]] = field(default_factory=list)
    projector_file: Path | None = None
    new_projector_seed: int | None = None

    def build(self, cls, backends=None):
        """`cls(config)` on the meta device: the model this plan fills."""
        with torch.device("meta"):
            return cls(self.config, backends)

    def load(self, model, dtype, device) -> None:
        """Place every tensor whole into `model` (built by `build`): the one-process loader."""
        for tensors, key_map in self.sources:
            _load_into(model, tensors(False), key_map, dtype, device)
        if self.projector_file is not None:
            load_projector(model, self.projector_file, dtype=dtype, device=device)
        elif self.new_projector_seed is not None:
            _new_projector(model.projector.linears, self.new_projector_seed,
                           dtype or model.language_model.embed_tokens.weight.dtype, device)
        _check_complete(model, self.what)


# --- sharded loading ---------------------------------------------------------------------------------

_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _unwrapped_name(name: str) -> str:
    """A parameter name without the parts activation checkpointing and compile wrappers insert."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _local_part(param) -> tuple[tuple[slice, ...], torch.Tensor]:
    """(the index of this rank's part in the full tensor, the tensor that holds it): a DTensor's local
    shard (FSDP2 shards dim 0, uneven on the last ranks; HSDP replicates over the other mesh dim), or a
    plain parameter whole (the replicated frozen LLM of stage 1)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import (
            compute_local_shape_and_global_offset,
        )

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local = param.to_local()
        assert tuple(local.shape) == tuple(shape), (tuple(local.shape), shape)
        return tuple(slice(o, o + n) for o, n in zip(offset, shape)), local
    return tuple(slice(0, n) for n in param.shape), param


def _shape(tensor) -> tuple[int, ...]:
    return tuple(tensor.get_shape()) if hasattr(tensor, "get_shape") else tuple(tensor.shape)


@torch.no_grad()
def load_sharded(model, plan: LoadPlan, *, grown: dict[str, int] | None = None, keep_carried: bool = True,
                 carried_dtype: torch.dtype = torch.float32) -> None:
    """Fill `model` (built by plan.build, possibly grown by resize_token_embeddings, sharded by FSDP2 on
    the meta device, then materialized by `to_empty`) with this rank's part of every tensor of `plan`.

    Each parameter receives only its local rows, read as a slice of the memory-mapped safetensors
    file, so a rank's host memory holds its shard plus at most one tensor, never the model. Names go
    through the same mapping (`_resolve`) as the one-process loader and the same errors are raised
    (unexpected key, shape mismatch, given twice, missing tensors, projector file errors).

    grown: parameter -> the row count stored in the checkpoint, for the embedding and head that
      `resize_token_embeddings` grew: the new rows are the mean of the stored rows, computed in fp32 from
      the whole tensor exactly as the one-process path does.
    keep_carried: keep the tensors the forward never uses (model.carried, fp32 on the host as the
      one-process path keeps them); only the rank that writes the export needs them.
    """
    params = {_unwrapped_name(n): p for n, p in model.named_parameters()}
    grown = grown or {}
    placed: set[str] = set()

    def place(name: str, tensor, source: str, *, again: bool = False) -> None:
        current = params.get(name)
        expected = None if current is None else (grown[name], *current.shape[1:]) if name in grown else current.shape
        _check_placeable(expected, name, _shape(tensor), source, placed=name in placed and not again)
        index, local = _local_part(current)
        if name in grown:
            full = tensor[:].float()
            rows = current.shape[0] - full.shape[0]
            part = torch.cat([full, full.mean(0, keepdim=True).expand(rows, -1)])[index]
        elif local.numel() == 0:
            part = None
        else:
            part = tensor[index]
        if part is not None:
            local.copy_(part)
        placed.add(name)

    for tensors, key_map in plan.sources:
        for name, canonical, source, tensor in _resolve(tensors(True), key_map, plan.config):
            if name is None:
                if keep_carried:
                    model.carried[canonical] = _owned(tensor[:], carried_dtype, "cpu")
            else:
                place(name, tensor, source)
    if plan.projector_file is not None:  # replaces the checkpoint's projector, if it holds one
        from_file = set()
        for name, source, tensor in _projector_tensors(plan.projector_file, plan.config):
            place(name, tensor, source, again=name not in from_file)
            from_file.add(name)
        prefix = "projector."
        _raise_missing_projector(plan.projector_file, [n[len(prefix):] for n in params
                                                       if n.startswith(prefix) and n not in from_file], plan.config)
    elif plan.new_projector_seed is not None:
        with torch.device("meta"):
            linears = nn.ModuleList(nn.Linear(m.in_features, m.out_features) for m in model.projector.linears)
        _new_projector(linears, plan.new_projector_seed, torch.float32, "cpu")
        for name, p in linears.named_parameters():
            place(f"projector.linears.{name}", p, f"new projector (seed {plan.new_projector_seed})")
    # LoRA adapters are no checkpoint's: layers/lora.py init_lora_ gives them their start.
    _raise_missing([n for n in params if n not in placed and not is_adapter(n)], plan.what)


# --- public entry points --------------------------------------------------------------------------


def load_llava(cls, path: Path, *, dtype=None, device="cpu", backends=None, vision_tower=None, **overrides):
    """`cls` (Llava) from a llava-hf or an original-LLaVA directory: see Llava.from_pretrained."""
    plan = plan_llava(path, vision_tower=vision_tower, **overrides)
    model = plan.build(cls, backends)
    plan.load(model, dtype, device)
    return model


def plan_llava(path: Path, *, vision_tower=None, projector_weights=None, **overrides) -> LoadPlan:
    """The LoadPlan of a llava-hf or an original-LLaVA directory (config errors raise now), optionally
    with a stage-1 projector file that replaces the checkpoint's projector."""
    raw = read_config(path)
    architecture = (raw.get("architectures") or [""])[0]
    if architecture == "LlavaForConditionalGeneration" or raw.get("model_type") == "llava" and "text_config" in raw:
        config = LlavaConfig.from_hf_llava(raw, **overrides)
        plan = LoadPlan(config, str(path), [(lambda lazy: iter_tensors(path, lazy), canonical_llava_key)])
    elif architecture == "LlavaLlamaForCausalLM" or "mm_projector_type" in raw or "mm_hidden_size" in raw:
        plan = _plan_original(path, raw, vision_tower, overrides)
    else:
        raise ValueError(
            f"{path}/config.json: unknown architecture {architecture or raw.get('model_type')!r}; expected "
            "LlavaForConditionalGeneration (llava-hf) or LlavaLlamaForCausalLM (original LLaVA)"
        )
    plan.projector_file = None if projector_weights is None else Path(projector_weights)
    return plan


def _plan_original(path, raw, vision_tower, overrides) -> LoadPlan:
    select = raw.get("mm_vision_select_feature", "patch")
    vision_dir = Path(vision_tower or raw.get("mm_vision_tower") or "")
    config_args = dict(
        text=TextConfig.from_hf({k: v for k, v in raw.items() if k != "model_type"}),
        projector_type=raw.get("mm_projector_type", "linear"),
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select=select,
        image_token_id=-200,  # LLaVA's IMAGE_TOKEN_INDEX: a placeholder outside the vocabulary
        pad_token_id=raw.get("pad_token_id"),
    )
    has_vision = any(k.startswith("model.vision_tower.vision_tower.") for k in checkpoint_keys(path))
    if has_vision:
        vision_cfg = VisionConfig.from_hf(_clip_vision_config(read_config(vision_dir)) if vision_dir.is_dir() else {})
    else:
        if not vision_dir.is_dir():
            raise ValueError(
                f"{path}: the checkpoint holds no vision tower and mm_vision_tower {str(vision_dir)!r} is not a local "
                "directory; pass vision_tower=CLIP_DIR"
            )
        vision_cfg = VisionConfig.from_hf(_clip_vision_config(read_config(vision_dir)))
    config = LlavaConfig(vision=vision_cfg, **{**config_args, **overrides})
    plan = LoadPlan(config, str(path), [(lambda lazy: iter_tensors(path, lazy), lambda k: original_llava_key(k, config))])
    if not has_vision:
        plan.sources.append((lambda lazy: _clip_tensors(vision_dir, lazy), _same))
    return plan


def _same(key: str) -> str:
    return key


def _clip_vision_config(raw: dict) -> dict:
    if raw.get("model_type") == "clip":
        return raw["vision_config"]
    if raw.get("model_type") != "clip_vision_model":
        raise ValueError(f"expected a CLIP model directory, found model_type {raw.get('model_type')!r}")
    return raw


_CLIP_VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def _clip_tensors(path: Path, lazy: bool = False):
    """The vision-model tensors of a CLIPVisionModel or CLIPModel directory, under llava-hf names.
    A full CLIPModel also holds the text tower and projections, which LLaVA never uses: they are skipped."""
    for key, file, tensor in iter_tensors(path, lazy):
        if key.startswith("vision_model."):
            yield _VISION + key[len("vision_model.") :], file, tensor
        elif key.startswith(_CLIP_VISION_PARTS):  # transformers 5 writes CLIPVisionModel without the prefix
            yield _VISION + key, file, tensor
        elif not key.startswith(("text_model.", "text_projection.", "visual_projection.", "logit_scale")):
            raise ValueError(f"{file}: unexpected key {key!r} in a CLIP checkpoint")


def _llama_tensors(path: Path, lazy: bool = False):
    for key, file, tensor in iter_tensors(path, lazy):
        if key == "lm_head.weight":
            yield _LM_HEAD, file, tensor
        elif key.startswith("model."):
            yield _LLM + key[len("model.") :], file, tensor
        else:
            raise ValueError(f"{file}: unexpected key {key!r} in a LLaMA checkpoint")


def load_components(cls, vision: Path, llm: Path, projector_weights, *, dtype=None, device="cpu", seed: int = 0,
                    backends=None, **overrides):
    """`cls` (Llava) from a CLIP and a LLaMA directory: see Llava.from_components."""
    plan = plan_components(vision, llm, projector_weights, seed=seed, **overrides)
    model = plan.build(cls, backends)
    plan.load(model, dtype, device)
    return model


def plan_components(vision: Path, llm: Path, projector_weights=None, *, seed: int = 0, **overrides) -> LoadPlan:
    """The LoadPlan of a CLIP directory + a LLaMA directory + a projector file or a new seeded projector."""
    llm_raw = read_config(llm)
    if llm_raw.get("model_type") != "llama":
        raise ValueError(f"{llm}/config.json: model_type {llm_raw.get('model_type')!r}, expected 'llama'")
    text = TextConfig.from_hf(llm_raw)
    config = LlavaConfig(
        vision=VisionConfig.from_hf(_clip_vision_config(read_config(vision))),
        text=text,
        image_token_id=overrides.pop("image_token_id", text.vocab_size),
        pad_token_id=llm_raw.get("pad_token_id"),
        **overrides,
    )
    plan = LoadPlan(config, f"{vision} + {llm}", [(lambda lazy: _clip_tensors(vision, lazy), _same),
                                                   (lambda lazy: _llama_tensors(llm, lazy), _same)])
    if projector_weights is not None:
        plan.projector_file = Path(projector_weights)
    else:
        plan.new_projector_seed = seed
    return plan


def _new_projector(linears: nn.ModuleList, seed, dtype, device) -> None:
    """A fresh projector for stage 1 (model/init.py's rule), drawn in fp32 on the host so a seed gives the
    same weights for every dtype and device."""
    linears.to_empty(device="cpu").float()
    init_projector_(linears, torch.Generator().manual_seed(seed))
    linears.to(device=device, dtype=dtype)


def _projector_tensors(path: Path, config: LlavaConfig) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(our parameter name, source for messages, tensor) of a projector file; errors for a missing file
    or a tensor that is not a projector weight."""
    if not path.is_file():
        raise ValueError(f"{path}: projector file not found")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key, tensor in state.items():
        canonical = original_llava_key(key, config) if "mm_projector" in key else canonical_llava_key(key)
        name = to_module_name(canonical, config) if canonical.startswith("multi_modal_projector.") else None
        if name is None:
            raise ValueError(f"{path}: key {key!r} is not a projector weight")
        yield name, f"{path}: key {key!r}", tensor


def _raise_missing_projector(path: Path, missing: list[str], config: LlavaConfig) -> None:
    if missing:
        raise ValueError(f"{path}: missing projector tensors {missing} for a {config.projector_type} projector")


def load_projector(model, path: Path, *, dtype=None, device=None) -> None:
    """LLaVA's mm_projector.bin (a torch state dict) or a safetensors file from save_projector."""
    tensors = list(_projector_tensors(path, model.config))  # file errors before the projector is emptied
    device = device or model.lm_head.weight.device
    dtype = dtype or model.lm_head.weight.dtype
    with torch.device("meta"):
        for i, linear in enumerate(model.projector.linears):
            model.projector.linears[i] = nn.Linear(linear.in_features, linear.out_features)
    for name, source, tensor in tensors:
        _place(model, name, tensor, source, dtype, device)
    _raise_missing_projector(path, [n for n, p in model.projector.named_parameters() if p.is_meta], model.config)


def save_projector(model, path: Path) -> None:
    """Keys as LLaVA names them (model.mm_projector.<Sequential index>.*), so its tools read it too."""
    depth = model.config.projector_depth
    state = {}
    for i, linear in enumerate(model.projector.linears):
        prefix = "model.mm_projector." + ("" if depth == 1 else f"{2 * i}.")
        state[prefix + "weight"] = linear.weight.detach().cpu().contiguous()
        state[prefix + "bias"] = linear.bias.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", "projector_type": model.config.projector_type})


def unused_vision_tensors(config: LlavaConfig, gen: torch.Generator, *, dtype, device) -> dict[str, torch.Tensor]:
    """Randomly initialized stand-ins (model/init.py's rules) for the checkpoint tensors the forward never
    uses (vision layers after the selected one, post_layernorm), so a model made from scratch still exports
    completely. Keys are llava-hf names."""
    v = config.vision
    norm = nn.LayerNorm(v.hidden_size, device=device, dtype=dtype)  # its own init is the rule's: 1 and 0
    tensors = {_VISION + f"post_layernorm.{name}": p.detach() for name, p in norm.named_parameters()}
    for i in range(config.num_vision_layers_run, v.num_hidden_layers):
        with torch.device("meta"):  # no draw from torch's global generator: `gen` gives every value
            layer = CLIPEncoderLayer(v)
        layer = layer.to_empty(device=device).to(dtype)
        init_transformer_(layer, gen)
        tensors.update({f"{_VISION}encoder.layers.{i}.{name}": p.detach() for name, p in layer.named_parameters()})
    return tensors


class ShardWriter:
    """A checkpoint directory written as its tensors arrive: config.json, safetensors shards of at most
    `max_shard_bytes` (a larger tensor gets a shard of its own), and the index when there is more than one
    shard, named as transformers names them (model.safetensors, or model-0000i-of-0000n.safetensors +
    model.safetensors.index.json). Only the shard being filled is held in memory, so an export streamed
    tensor by tensor (train/export.py) never holds the model. Shards of a former checkpoint in `path` are
    removed first. Use as a context manager; config["dtype"] is the first tensor's."""

    def __init__(self, path: Path, config: dict, max_shard_bytes: int):
        self.path, self.config, self.max_shard_bytes = path, config, max_shard_bytes
        path.mkdir(parents=True, exist_ok=True)
        for old in [*path.glob("model-*-of-*.safetensors"), path / SINGLE_FILE, path / INDEX_FILE]:
            old.unlink(missing_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.shards: list[list[str]] = []  # keys of each written shard
        self.dtype: torch.dtype | None = None

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.pending or any(key in shard for shard in self.shards):
            raise ValueError(f"{self.path}: tensor {key!r} given twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.dtype = self.dtype or tensor.dtype
        self.pending[key] = _alone(tensor).contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, str(self.path / f"part-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is not None:  # a failed export leaves no half-named checkpoint behind
            for part in self.path.glob("part-*.tmp"):
                part.unlink()
            return
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.path / f"part-{i:05d}.tmp").replace(self.path / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: name for name, keys in zip(names, self.shards) for k in keys}}
            (self.path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if self.dtype is not None:
            self.config["dtype"] = str(self.dtype).removeprefix("torch.")
        (self.path / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")


def _write_checkpoint(path: Path, config: dict, tensors, max_shard_bytes: int) -> None:
    """config.json and safetensors shards (+ the index when more than one) of `tensors`, a dict or an
    iterable of (key, tensor) pairs consumed one at a time (ShardWriter)."""
    with ShardWriter(path, config, max_shard_bytes) as writer:
        for key, t in tensors.items() if isinstance(tensors, dict) else tensors:
            writer.add(key, t)


def _alone(t: torch.Tensor) -> torch.Tensor:
    """The tensor in a storage of its own: tensors gathered from FSDP shards can be views into one larger
    buffer, which safetensors refuses to write (it would store the whole buffer)."""
    t = t.detach()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


ORIGINAL_VISION_DIR = "vision_tower"  # the CLIP tower's directory inside an original-LLaVA export


def save_llava(model, path: Path, *, max_shard_bytes: int, state=None) -> None:
    """Write the llava-hf layout (an mlp2x_gelu projector, what transformers' LlavaForConditionalGeneration
    holds), or else the original-LLaVA layout (`_save_original_llava`): config.json and safetensors shards
    (+ index when more than one).

    state: (our name, tensor) pairs, consumed one at a time (e.g. full tensors gathered from FSDP shards
    one by one: train/export.py); default the model's own parameters.
    """
    tied = model.config.text.tie_word_embeddings

    def tensors():
        for name, t in model.named_parameters() if state is None else state:
            key = to_checkpoint_key(name)
            if not (tied and key == _LM_HEAD):
                yield key, t
        yield from model.carried.items()

    if model.config.projector_type == "mlp2x_gelu":
        _write_checkpoint(path, model.config.to_hf_llava(), tensors(), max_shard_bytes)
    else:
        _save_original_llava(model.config, path, tensors(), max_shard_bytes)


def _original_llava_name(key: str, depth: int) -> str:
    """Canonical llava-hf name of an LLM or projector tensor -> its original LLaVA name (inverse of
    original_llava_key): model.layers.*, lm_head.weight, model.mm_projector[.<Sequential index>].*"""
    m = re.match(r"^multi_modal_projector\.linear_(\d+)\.(weight|bias)$", key)
    if m:
        return "model.mm_projector." + ("" if depth == 1 else f"{2 * (int(m.group(1)) - 1)}.") + m.group(2)
    if key == _LM_HEAD:
        return "lm_head.weight"
    assert key.startswith(_LLM), key
    return "model." + key[len(_LLM):]


def _save_original_llava(config: LlavaConfig, path: Path, tensors, max_shard_bytes: int) -> None:
    """The original LLaVA layout (haotian-liu/LLaVA's LlavaLlamaForCausalLM), which holds every projector type:
    config.json (LlavaConfig.to_original_llava) and shards with the LLM and `model.mm_projector.*`, and the
    vision tower as a CLIPVisionModel directory `<path>/vision_tower/` that config.json's mm_vision_tower names
    (absolute; after moving the export pass `vision_tower=` to from_pretrained). LLaVA's own checkpoints name
    the tower the same way (a hub id or a path) and load it from there; `plan_llava` reads the layout back.
    tensors: (canonical llava-hf key, tensor) pairs, consumed one at a time."""
    vision_dir = path / ORIGINAL_VISION_DIR
    with ShardWriter(vision_dir, {"architectures": ["CLIPVisionModel"], **config.vision.to_hf()},
                     max_shard_bytes) as vision, \
            ShardWriter(path, config.to_original_llava(str(vision_dir.resolve())), max_shard_bytes) as rest:
        for key, t in tensors:
            if key.startswith(_VISION):
                vision.add("vision_model." + key[len(_VISION):], t)
            else:
                rest.add(_original_llava_name(key, config.projector_depth), t)


def save_components(model, vision_dir: Path, llm_dir: Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """The vision tower as a CLIPVisionModel directory and the LLM as a LlamaForCausalLM directory: the
    two inputs of `Llava.from_components` (e.g. a tower trained here, an LLM extracted from a finetune).
    The projector is not part of either (save_projector writes it)."""
    vision, llm = {}, {}
    tensors = {to_checkpoint_key(n): t for n, t in model.named_parameters()} | model.carried
    for key, t in tensors.items():
        if key.startswith(_VISION):
            vision["vision_model." + key[len(_VISION):]] = t
        elif key == _LM_HEAD:
            if not model.config.text.tie_word_embeddings:
                llm["lm_head.weight"] = t
        elif key.startswith(_LLM):
            llm["model." + key[len(_LLM):]] = t
    _write_checkpoint(vision_dir, {"architectures": ["CLIPVisionModel"], **model.config.vision.to_hf()}, vision,
                      max_shard_bytes)
    text = {"architectures": ["LlamaForCausalLM"], **model.config.text.to_hf(), "pad_token_id": model.config.pad_token_id}
    _write_checkpoint(llm_dir, text, llm, max_shard_bytes)
