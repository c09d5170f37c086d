"""Hugging Face checkpoint interop: read llava-hf, original-LLaVA, CLIP and LLaMA directories; write llava-hf.

Safetensors only. Loading streams: the model is built on the meta device and each tensor is read
from its shard and placed into the model one at a time, so host memory peaks near the largest tensor
(memory-mapped shards) instead of holding the model twice.

Every checkpoint key is first rewritten to its *canonical* llava-hf name (the layout of
llava-hf/llava-1.5-7b-hf, which transformers 4.x and 5.x both load), then mapped to our module names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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


def iter_tensors(path: Path) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(key, file, tensor) for every tensor of a directory's shards, one tensor in memory at a time."""
    seen: dict[str, Path] = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as shard:
            for key in shard.keys():
                if key in seen:
                    raise ValueError(f"{f}: key {key!r} appears again (first in {seen[key]})")
                seen[key] = f
                yield key, f, shard.get_tensor(key)


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


def _place(model: nn.Module, name: str, tensor: torch.Tensor, source: str, dtype, device) -> None:
    module_name, _, leaf = name.rpartition(".")
    try:
        current = model.get_submodule(module_name)._parameters.get(leaf)
    except AttributeError:
        current = None
    if current is None:
        raise ValueError(f"{source}: unexpected key, the model has no parameter {name!r}")
    if tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(f"{source}: shape {tuple(tensor.shape)} but the model expects {tuple(current.shape)}")
    if not current.is_meta:
        raise ValueError(f"{source}: {name!r} is given twice")
    value = _owned(tensor, dtype, device)
    model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=current.requires_grad)


def _check_complete(model: nn.Module, what: str) -> None:
    missing = [to_checkpoint_key(n) for n, p in model.named_parameters() if p.is_meta]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{what}: missing tensors {shown}; nothing is left randomly initialized")


def _retie(model) -> None:
    if model.config.text.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight


def _load_into(model, tensors, key_map, dtype, device) -> None:
    """Place every (key, file, tensor) into the model; keys the forward does not use are carried."""
    for key, file, tensor in tensors:
        canonical = key_map(key)
        name = to_module_name(canonical, model.config)
        if name is None:
            model.carried[canonical] = _owned(tensor, dtype, device)
        else:
            _place(model, name, tensor, f"{file}: key {key!r}", dtype, device)
    _retie(model)


# --- public entry points --------------------------------------------------------------------------


def load_llava(cls, path: Path, *, dtype=None, device="cpu", backends=None, vision_tower=None, **overrides):
    """`cls` (Llava) from a llava-hf or an original-LLaVA directory: see Llava.from_pretrained."""
    raw = read_config(path)
    architecture = (raw.get("architectures") or [""])[0]
    if architecture == "LlavaForConditionalGeneration" or raw.get("model_type") == "llava" and "text_config" in raw:
        config = LlavaConfig.from_hf_llava(raw, **overrides)
        with torch.device("meta"):
            model = cls(config, backends)
        _load_into(model, iter_tensors(path), canonical_llava_key, dtype, device)
    elif architecture == "LlavaLlamaForCausalLM" or "mm_projector_type" in raw or "mm_hidden_size" in raw:
        model = _load_original(cls, path, raw, dtype, device, backends, vision_tower, overrides)
    else:
        raise ValueError(
            f"{path}/config.json: unknown architecture {architecture or raw.get('model_type')!r}; expected "
            "LlavaForConditionalGeneration (llava-hf) or LlavaLlamaForCausalLM (original LLaVA)"
        )
    _check_complete(model, str(path))
    return model


def _load_original(cls, path, raw, dtype, device, backends, vision_tower, overrides):
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
    with torch.device("meta"):
        model = cls(config, backends)
    _load_into(model, iter_tensors(path), lambda k: original_llava_key(k, config), dtype, device)
    if not has_vision:
        _load_into(model, _clip_tensors(vision_dir), lambda k: k, dtype, device)
    return model


def _clip_vision_config(raw: dict) -> dict:
    if raw.get("model_type") == "clip":
        return raw["vision_config"]
    if raw.get("model_type") != "clip_vision_model":
        raise ValueError(f"expected a CLIP model directory, found model_type {raw.get('model_type')!r}")
    return raw


_CLIP_VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def _clip_tensors(path: Path):
    """The vision-model tensors of a CLIPVisionModel or CLIPModel directory, under llava-hf names.
    A full CLIPModel also holds the text tower and projections, which LLaVA never uses: they are skipped."""
    for key, file, tensor in iter_tensors(path):
        if key.startswith("vision_model."):
            yield _VISION + key[len("vision_model.") :], file, tensor
        elif key.startswith(_CLIP_VISION_PARTS):  # transformers 5 writes CLIPVisionModel without the prefix
            yield _VISION + key, file, tensor
        elif not key.startswith(("text_model.", "text_projection.", "visual_projection.", "logit_scale")):
            raise ValueError(f"{file}: unexpected key {key!r} in a CLIP checkpoint")


def _llama_tensors(path: Path):
    for key, file, tensor in iter_tensors(path):
        if key == "lm_head.weight":
            yield _LM_HEAD, file, tensor
        elif key.startswith("model."):
            yield _LLM + key[len("model.") :], file, tensor
        else:
            raise ValueError(f"{file}: unexpected key {key!r} in a LLaMA checkpoint")


def load_components(cls, vision: Path, llm: Path, projector_weights, *, dtype=None, device="cpu", seed: int = 0,
                    backends=None, **overrides):
    """`cls` (Llava) from a CLIP and a LLaMA directory: see Llava.from_components."""
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
    with torch.device("meta"):
        model = cls(config, backends)
    _load_into(model, _clip_tensors(vision), lambda k: k, dtype, device)
    _load_into(model, _llama_tensors(llm), lambda k: k, dtype, device)
    if projector_weights is not None:
        load_projector(model, Path(projector_weights), dtype=dtype, device=device)
    else:
        _new_projector(model, seed, dtype or model.language_model.embed_tokens.weight.dtype, device)
    _check_complete(model, f"{vision} + {llm}")
    return model


def _new_projector(model, seed, dtype, device) -> None:
    """A fresh projector for stage 1 (model/init.py's rule), drawn in fp32 on the host so a seed gives the
    same weights for every dtype and device."""
    model.projector.linears.to_empty(device="cpu").float()
    init_projector_(model.projector.linears, torch.Generator().manual_seed(seed))
    model.projector.linears.to(device=device, dtype=dtype)


def load_projector(model, path: Path, *, dtype=None, device=None) -> None:
    """LLaVA's mm_projector.bin (a torch state dict) or a safetensors file from save_projector."""
    if not path.is_file():
        raise ValueError(f"{path}: projector file not found")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    device = device or model.lm_head.weight.device
    dtype = dtype or model.lm_head.weight.dtype
    with torch.device("meta"):
        for i, linear in enumerate(model.projector.linears):
            model.projector.linears[i] = nn.Linear(linear.in_features, linear.out_features)
    for key, tensor in state.items():
        canonical = original_llava_key(key, model.config) if "mm_projector" in key else canonical_llava_key(key)
        name = to_module_name(canonical, model.config) if canonical.startswith("multi_modal_projector.") else None
        if name is None:
            raise ValueError(f"{path}: key {key!r} is not a projector weight")
        _place(model, name, tensor, f"{path}: key {key!r}", dtype, device)
    missing = [n for n, p in model.projector.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: missing projector tensors {missing} for a {model.config.projector_type} projector")


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


def _write_checkpoint(path: Path, config: dict, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """config.json and safetensors shards (+ the index when more than one), written by huggingface_hub as
    transformers writes them; shards of a former, larger checkpoint in `path` are removed."""
    from huggingface_hub import save_torch_state_dict

    path.mkdir(parents=True, exist_ok=True)
    config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_torch_state_dict({k: _alone(t) for k, t in tensors.items()}, path, max_shard_size=max_shard_bytes,
                          metadata={"format": "pt"})


def _alone(t: torch.Tensor) -> torch.Tensor:
    """The tensor in a storage of its own: tensors gathered from FSDP shards can be views into one larger
    buffer, which safetensors refuses to write (it would store the whole buffer)."""
    t = t.detach()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_llava(model, path: Path, *, max_shard_bytes: int, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the llava-hf layout: config.json and safetensors shards (+ index when more than one).

    state: our-name -> tensor, e.g. a full state dict gathered from FSDP; default the model's own.
    """
    if state is None:
        state = dict(model.named_parameters())
    tensors = {to_checkpoint_key(n): t for n, t in state.items()}
    if model.config.text.tie_word_embeddings:
        tensors.pop(_LM_HEAD, None)
    for key, t in model.carried.items():
        tensors.setdefault(key, t)
    _write_checkpoint(path, model.config.to_hf_llava(), tensors, max_shard_bytes)


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
