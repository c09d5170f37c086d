"""Hugging Face checkpoint interop, the loaders and savers: read llava-hf (Llava and LlavaNext),
original-LLaVA(-NeXT), CLIP and LLaMA directories; write llava-hf, or the original-LLaVA layout for the
projectors llava-hf cannot hold (linear, mlpNx_gelu with N != 2).

Safetensors, and .bin pickles through a converted copy (files: safetensors_io.py; key names: keys.py and families/). Loading streams: the model is
built on the meta device and each tensor is read from its memory-mapped shard and placed into the model one
at a time, so host memory peaks near the largest tensor instead of holding the model twice.

Each loader first makes a `LoadPlan` (the config and, in order, the tensor sources with their key
mappings: nothing read yet); `LoadPlan.load` places whole tensors from it (one process), and
train/sharded_load.py `load_sharded` places only this rank's rows of each tensor into a model that FSDP2 has
sharded (multi-rank training). Both go through `LoadPlan.resolved` and the checks below, so they raise the
same errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import families
from .config import LlavaConfig, VisionConfig
from .hub import is_hub_id, resolve, resolve_projector
from .init import init_image_newline_, init_projector_
from .keys import (NEWLINE, ROLE_PREFIX, canonical_llava_key, original_llava_key, original_llava_name,
                   split_roles, to_checkpoint_key, to_module_name)
from .safetensors_io import ShardWriter, checkpoint_keys, iter_tensors, load_bin, read_config, write_checkpoint
from .stacked import split, stack, stacked_key

ORIGINAL_VISION_DIR = "vision_tower"  # the CLIP tower's directory inside an original-LLaVA export
LLAVA_HF = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")  # the llava-hf architectures


# --- placing tensors into a meta-built model ------------------------------------------------------


def owned(tensor: torch.Tensor, dtype, device) -> torch.Tensor:
    """A copy in its own memory: safetensors hands out views of the memory-mapped shard, which must not
    outlive it (a shard rewritten in place under a running job would change or fault the weights)."""
    value = tensor.to(device=device, dtype=dtype or tensor.dtype)
    return value.clone() if value.data_ptr() == tensor.data_ptr() else value


def check_placeable(expected, name: str, shape, source: str, placed: bool) -> None:
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
    check_placeable(None if current is None else current.shape, name, tensor.shape, source,
                    placed=current is not None and not current.is_meta)
    value = owned(tensor, dtype, device)
    model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=current.requires_grad)


def check_complete(missing_names: list[str], config: LlavaConfig, what: str) -> None:
    """ValueError naming (as checkpoint keys, a stacked tensor's once for its parts) the parameters
    `missing_names` that no source gave."""
    whole = stacked_key(config)
    missing = list(dict.fromkeys(whole.get(k, k) for k in (to_checkpoint_key(n, config) for n in missing_names)))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{what}: missing tensors {shown}; nothing is left randomly initialized")


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

    def resolved(self, lazy: bool) -> Iterator[tuple[str | None, str, str, object]]:
        """(our parameter name or None for a carried tensor, canonical key, source for messages, tensor or
        RowReader) for every tensor of the sources, stacked tensors split into their parts (model/stacked.py):
        the one key mapping of both loaders."""

        def canonical():
            for tensors, key_map in self.sources:
                for key, file, tensor in tensors(lazy):
                    yield key_map(key), f"{file}: key {key!r}", tensor

        for canonical_key, source, tensor in split(canonical(), self.config):
            yield to_module_name(canonical_key, self.config), canonical_key, source, tensor

    def load(self, model, dtype, device) -> None:
        """Place every tensor whole into `model` (built by `build`): the one-process loader. Keys the
        forward does not use are carried."""
        for name, canonical, source, tensor in self.resolved(False):
            if name is None:
                model.carried[canonical] = owned(tensor, dtype, device)
            else:
                _place(model, name, tensor, source, dtype, device)
        if model.config.text.tie_word_embeddings:
            model.lm_head.weight = model.language_model.embed_tokens.weight
        if self.projector_file is not None:
            load_projector(model, self.projector_file, dtype=dtype, device=device)
        elif self.new_projector_seed is not None:
            new_projector(model.projector.linears, self.new_projector_seed,
                          dtype or model.language_model.embed_tokens.weight.dtype, device)
        check_complete([n for n, p in model.named_parameters() if p.is_meta], self.config, self.what)


def family_tensors(path: Path, family: families.Family, lazy: bool = False):
    """(canonical llava-hf key, file, tensor) of a family's own directory (a CLIP or a LLaMA checkpoint);
    tensors LLaVA never uses (a CLIPModel's text tower) are skipped."""
    prefix = ROLE_PREFIX[family.role]
    for key, file, tensor in iter_tensors(path, lazy):
        try:
            standard = family.standard_key(key)
        except LookupError:
            raise ValueError(f"{file}: unexpected key {key!r} in a {family.name} checkpoint") from None
        if standard is not None:
            yield prefix + standard, file, tensor


def _read_part(path: Path, role: str):
    """(family, VisionConfig or TextConfig, config.json dict) of a tower or decoder directory, the family
    found by its config's model_type."""
    raw = read_config(path)
    family = families.find(role, raw.get("model_type"), f"{path}/config.json")
    return family, family.read_config(raw), raw


def plan_llava(path: Path, *, vision_tower=None, projector_weights=None, **overrides) -> LoadPlan:
    """The LoadPlan of a llava-hf or an original-LLaVA directory (config errors raise now), optionally
    with a stage-1 projector file that replaces the checkpoint's projector. `path` may be a Hub id (hub.py)."""
    path = resolve(path, "model")
    raw = read_config(path)
    architecture = (raw.get("architectures") or [""])[0]
    if architecture in LLAVA_HF or raw.get("model_type") in ("llava", "llava_next") and "text_config" in raw:
        config = LlavaConfig.from_hf_llava(raw, **overrides)
        plan = LoadPlan(config, str(path), [(lambda lazy: iter_tensors(path, lazy), canonical_llava_key)])
    elif architecture == "LlavaLlamaForCausalLM" or "mm_projector_type" in raw or "mm_hidden_size" in raw:
        plan = _plan_original(path, raw, vision_tower, overrides)
    else:
        raise ValueError(
            f"{path}/config.json: unknown architecture {architecture or raw.get('model_type')!r}; expected "
            "LlavaForConditionalGeneration or LlavaNextForConditionalGeneration (llava-hf) or LlavaLlamaForCausalLM "
            "(original LLaVA)"
        )
    plan.projector_file = None if projector_weights is None else resolve_projector(projector_weights)
    return plan


# What the original layout's config.json says of a LLaMA decoder; LLaVA-NeXT's other original-layout classes
# (LlavaQwenForCausalLM "llava_qwen", LlavaMistralForCausalLM "llava_mistral", ...) carry other decoders.
_ORIGINAL_LLAMA = ("LlavaLlamaForCausalLM", {None, "llava", "llava_llama", "llama"})


def _plan_original(path, raw, vision_tower, overrides) -> LoadPlan:
    architecture = (raw.get("architectures") or [None])[0]
    if architecture not in (None, _ORIGINAL_LLAMA[0]) or raw.get("model_type") not in _ORIGINAL_LLAMA[1]:
        # Read as LLaMA, a Qwen decoder's q/k/v biases would be refused as unknown keys and Mistral's window dropped.
        raise ValueError(
            f"{path}/config.json: an original-layout LLaVA checkpoint of architecture {architecture!r} (model_type "
            f"{raw.get('model_type')!r}); fastllava reads the original layout only with a LLaMA decoder "
            f"({_ORIGINAL_LLAMA[0]}). Convert it to the llava-hf layout (LlavaForConditionalGeneration), whose "
            "text_config names the decoder's family, or load the tower and the decoder as components")
    config_args = dict(
        text=families.find("decoder", "llama", str(path)).read_config({k: v for k, v in raw.items()
                                                                          if k != "model_type"}),
        projector_type=raw.get("mm_projector_type", "linear"),
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select=raw.get("mm_vision_select_feature", "patch"),
        image_token_id=-200,  # LLaVA's IMAGE_TOKEN_INDEX: a placeholder outside the vocabulary
        pad_token_id=raw.get("pad_token_id"),
        **LlavaConfig.original_anyres_fields(raw, f"{path}/config.json"),
    )
    vision_dir, has_vision = original_vision_tower(path, raw, vision_tower)
    tower, vision_cfg, _ = _read_part(vision_dir, "tower") if vision_dir.is_dir() else (None, VisionConfig(), None)
    config = LlavaConfig(vision=vision_cfg, **{**config_args, **overrides})
    plan = LoadPlan(config, str(path), [(lambda lazy: iter_tensors(path, lazy), lambda k: original_llava_key(k, config))])
    if not has_vision:
        plan.sources.append((lambda lazy: family_tensors(vision_dir, tower, lazy), _same))
    return plan


def original_vision_tower(path: Path, raw: dict, vision_tower=None, fix: str = "pass vision_tower=CLIP_DIR"):
    """(tower directory, whether the checkpoint holds the tower's weights) of the original-LLaVA directory
    `path` whose config.json is `raw`: `vision_tower`, else mm_vision_tower, a Hub id resolved (hub.py) when the
    checkpoint has no tower of its own. ValueError naming mm_vision_tower, ending with `fix`, when the
    checkpoint needs that tower and it is neither a local directory nor resolvable."""
    vision_dir = Path(vision_tower or raw.get("mm_vision_tower") or "")
    has_vision = any(k.startswith("model.vision_tower.vision_tower.") for k in checkpoint_keys(path))
    if not has_vision and not vision_dir.is_dir() and is_hub_id(str(vision_dir)):
        # LLaVA's own configs name their tower by Hub id (mm_vision_tower: openai/clip-vit-large-patch14-336).
        try:
            vision_dir = resolve(vision_dir, f"{path}/config.json mm_vision_tower")
        except ValueError as e:
            raise ValueError(f"{e}; or {fix}") from None
    if not has_vision and not vision_dir.is_dir():
        raise ValueError(
            f"{path}: the checkpoint holds no vision tower and mm_vision_tower {str(vision_dir)!r} is not a local "
            f"directory; {fix}"
        )
    return vision_dir, has_vision


def _same(key: str) -> str:
    return key


def plan_components(vision: Path, llm: Path, projector_weights=None, *, seed: int = 0, **overrides) -> LoadPlan:
    """The LoadPlan of a tower directory (CLIP) + a decoder directory (LLaMA) + a projector file or a new
    seeded projector. Either directory may be a Hub id (hub.py)."""
    vision, llm = resolve(vision, "vision tower"), resolve(llm, "LLM")
    tower, vision_cfg, _ = _read_part(vision, "tower")
    decoder, text, llm_raw = _read_part(llm, "decoder")
    config = LlavaConfig(
        vision=vision_cfg,
        text=text,
        image_token_id=overrides.pop("image_token_id", text.vocab_size),
        pad_token_id=llm_raw.get("pad_token_id"),
        **overrides,
    )
    plan = LoadPlan(config, f"{vision} + {llm}", [(lambda lazy: family_tensors(vision, tower, lazy), _same),
                                                   (lambda lazy: family_tensors(llm, decoder, lazy), _same)])
    if projector_weights is not None:
        plan.projector_file = resolve_projector(projector_weights)
    else:
        plan.new_projector_seed = seed
    if config.anyres is not None:
        # Neither checkpoint holds it: drawn here, as LLaVA-NeXT does when AnyRes training starts (a plain
        # tensor source, so the one-process and the sharded loader place it like any checkpoint tensor).
        plan.sources.append((lambda lazy: new_image_newline(config, seed), _same))
    return plan


def new_image_newline(config: LlavaConfig, seed: int):
    """(canonical key, source for messages, tensor) of a new AnyRes image_newline, fp32, drawn from `seed`."""
    newline = torch.empty(config.text.hidden_size)
    init_image_newline_(newline, torch.Generator().manual_seed(seed))
    yield NEWLINE, f"new image_newline (seed {seed})", newline


def load_llava(cls, path: Path, *, dtype=None, device="cpu", backends=None, vision_tower=None, **overrides):
    """`cls` (Llava) from a llava-hf or an original-LLaVA directory: see Llava.from_pretrained."""
    plan = plan_llava(path, vision_tower=vision_tower, **overrides)
    model = plan.build(cls, backends)
    plan.load(model, dtype, device)
    return model


def load_components(cls, vision: Path, llm: Path, projector_weights, *, dtype=None, device="cpu", seed: int = 0,
                    backends=None, **overrides):
    """`cls` (Llava) from a CLIP and a LLaMA directory: see Llava.from_components."""
    plan = plan_components(vision, llm, projector_weights, seed=seed, **overrides)
    model = plan.build(cls, backends)
    plan.load(model, dtype, device)
    return model


# --- the projector --------------------------------------------------------------------------------


def new_projector(linears: nn.ModuleList, seed, dtype, device) -> None:
    """A fresh projector for stage 1 (model/init.py's rule), drawn in fp32 on the host so a seed gives the
    same weights for every dtype and device."""
    linears.to_empty(device="cpu").float()
    init_projector_(linears, torch.Generator().manual_seed(seed))
    linears.to(device=device, dtype=dtype)


def projector_tensors(path: Path, config: LlavaConfig) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(our parameter name, source for messages, tensor) of a projector file; errors for a missing file
    or a tensor that is not a projector weight."""
    if not path.is_file():
        raise ValueError(f"{path}: projector file not found")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = load_bin(path)
    for key, tensor in state.items():
        canonical = original_llava_key(key, config) if "mm_projector" in key else canonical_llava_key(key)
        name = to_module_name(canonical, config) if canonical.startswith("multi_modal_projector.") else None
        if name is None:
            raise ValueError(f"{path}: key {key!r} is not a projector weight")
        yield name, f"{path}: key {key!r}", tensor


def check_projector_complete(path: Path, missing: list[str], config: LlavaConfig) -> None:
    if missing:
        raise ValueError(f"{path}: missing projector tensors {missing} for a {config.projector_type} projector")


def load_projector(model, path: Path, *, dtype=None, device=None) -> None:
    """LLaVA's mm_projector.bin (a torch state dict) or a safetensors file from save_projector; or a directory
    or Hub repository holding one (hub.resolve_projector)."""
    path = resolve_projector(path)
    tensors = list(projector_tensors(path, model.config))  # file errors before the projector is emptied
    device = device or model.lm_head.weight.device
    dtype = dtype or model.lm_head.weight.dtype
    with torch.device("meta"):
        for i, linear in enumerate(model.projector.linears):
            model.projector.linears[i] = nn.Linear(linear.in_features, linear.out_features)
    for name, source, tensor in tensors:
        _place(model, name, tensor, source, dtype, device)
    check_projector_complete(path, [n for n, p in model.projector.named_parameters() if p.is_meta], model.config)


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


# --- saving ---------------------------------------------------------------------------------------


def unused_vision_tensors(config: LlavaConfig, gen: torch.Generator, *, dtype, device) -> dict[str, torch.Tensor]:
    """Randomly initialized stand-ins (the tower family's, by model/init.py's rules) for the checkpoint
    tensors the forward never uses (CLIP: vision layers after the selected one, post_layernorm), so a model
    made from scratch still exports completely. Keys are llava-hf names."""
    tower, _ = families.of(config)
    if tower.unused_tensors is None:
        return {}
    tensors = tower.unused_tensors(config, gen, dtype=dtype, device=device)
    return {ROLE_PREFIX["tower"] + key: t for key, t in tensors.items()}


def save_llava(model, path: Path, *, max_shard_bytes: int, state=None) -> None:
    """Write the llava-hf layout (an mlp2x_gelu projector, what transformers' LlavaForConditionalGeneration
    holds), or else the original-LLaVA layout (`_save_original_llava`): config.json and safetensors shards
    (+ index when more than one).

    state: (our name, tensor) pairs, consumed one at a time (e.g. full tensors gathered from FSDP shards
    one by one: train/export.py); default the model's own parameters.
    """
    config = model.config
    if config.projector_type == "mlp2x_gelu":
        write_checkpoint(path, config.to_hf_llava(), _checkpoint_tensors(model, state), max_shard_bytes)
    else:
        _save_original_llava(config, path, _checkpoint_tensors(model, state), max_shard_bytes)


def _checkpoint_tensors(model, state=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical llava-hf key, tensor) of every tensor a checkpoint of `model` holds: the parameters (or
    `state`'s (our name, tensor) pairs) without a tied LM head, then the carried tensors; the parts of a
    tensor the family's checkpoints stack, stacked (model/stacked.py)."""

    def tensors():
        tied = model.config.text.tie_word_embeddings
        for name, t in model.named_parameters() if state is None else state:
            if not (tied and name == "lm_head.weight"):
                yield to_checkpoint_key(name, model.config), t
        yield from model.carried.items()

    return stack(tensors(), model.config)


def _save_original_llava(config: LlavaConfig, path: Path, tensors, max_shard_bytes: int) -> None:
    """The original LLaVA layout (haotian-liu/LLaVA's LlavaLlamaForCausalLM), which holds every projector type:
    config.json (LlavaConfig.to_original_llava) and shards with the LLM and `model.mm_projector.*`, and the
    vision tower as a CLIPVisionModel directory `<path>/vision_tower/` that config.json's mm_vision_tower names
    (absolute; after moving the export pass `vision_tower=` to from_pretrained). LLaVA's own checkpoints name
    the tower the same way (a hub id or a path) and load it from there; `plan_llava` reads the layout back.
    tensors: (canonical llava-hf key, tensor) pairs, consumed one at a time."""
    vision_dir = path / ORIGINAL_VISION_DIR
    tower, _ = families.of(config)
    with ShardWriter(vision_dir, tower.write_config(config), max_shard_bytes) as vision, \
            ShardWriter(path, config.to_original_llava(str(vision_dir.resolve())), max_shard_bytes) as rest:
        for key, t in tensors:
            if key.startswith(ROLE_PREFIX["tower"]):
                vision.add(key[len(ROLE_PREFIX["tower"]):], t)
            else:
                rest.add(original_llava_name(key, config.projector_depth), t)


def save_components(model, vision_dir: Path, llm_dir: Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """The vision tower and the LLM (decoder + LM head) each as its family's own directory (CLIPVisionModel,
    LlamaForCausalLM): the two inputs of `Llava.from_components` (e.g. a tower trained here, an LLM extracted
    from a finetune). The projector is not part of either (save_projector writes it)."""
    config = model.config
    parts: dict[str, dict[str, torch.Tensor]] = {"tower": {}, "decoder": {}, "projector": {}}
    for role, key, t in split_roles(_checkpoint_tensors(model)):
        parts[role][key] = t
    for family, directory in zip(families.of(config), (vision_dir, llm_dir)):
        write_checkpoint(directory, family.write_config(config), parts[family.role], max_shard_bytes)
