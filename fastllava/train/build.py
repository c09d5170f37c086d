"""A Config's tokenizer, model (before FSDP) and dataset: what the Trainer is constructed from.

One process (`meta=False`): the whole model is loaded on the host, then `parallelize` shards it.
Several ranks (`train()` passes `meta=world_size > 1`): a checkpoint-loaded model is built on the meta
device with its LoadPlan attached, and `sharded_load.parallelize_and_load` reads each rank's shard
only, after FSDP has sharded the meta parameters, so no rank ever holds the whole model (see
fastllava/train/sharded_load.py). A model from scratch (`source=scratch`, tests and toy runs) is always
built whole: its seeded initialization draws every tensor in full.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from ..config import Config
from ..data.anyres_images import llava_next_processor
from ..data.dataset import LlavaDataset, anyres_loader
from ..data.images import PREPROCESSOR_FILE, Preprocess, load_image
from ..data.tokenize import TokenizerIds, load_tokenizer, prepare_tokenizer
from ..model import Llava
from ..model.families import of as families_of
from ..model.hf import original_vision_tower
from ..model.hub import resolve, resolve_projector
from ..model.safetensors_io import read_config


def resolve_references(cfg: Config) -> None:
    """Resolve every model reference `cfg` names (model/hub.py; a Hub id is downloaded now, or read from the
    cache), so that one that cannot be resolved, neither a path nor in the cache offline nor on the Hub, is a
    configuration error (ValueError naming its key) before anything is built; the builders then find each
    resolved in hub.py's per-process table. So is a pretrained original-LLaVA directory's own tower (its
    config.json's mm_vision_tower, where the checkpoint holds no tower: model/hf.py original_vision_tower)."""
    m = cfg.model
    tokenizer = next((k for k in ("tokenizer_path", "llm_path", "pretrained_path") if getattr(m, k)), None)
    keys = {"scratch": (), "components": ("vision_path", "llm_path"), "pretrained": ("pretrained_path",)}[m.source]
    for key in dict.fromkeys((tokenizer, *keys) if tokenizer else keys):
        resolve(getattr(m, key), f"model.{key}")
    if m.source == "pretrained":
        path = resolve(m.pretrained_path, "model.pretrained_path")
        raw = read_config(path)
        if "mm_vision_tower" in raw:
            original_vision_tower(path, raw, fix=f"set mm_vision_tower in {path}/config.json to a local CLIP directory")
    if m.projector_weights is not None and m.source != "scratch":
        resolve_projector(m.projector_weights)
    if cfg.data.image_processor is not None:
        resolve(cfg.data.image_processor, "data.image_processor", files=(PREPROCESSOR_FILE,))


def build_tokenizer(cfg: Config):
    """(tokenizer, its special-token ids) from model.tokenizer_path, else the LLM's or checkpoint's directory
    (each a local directory or a Hub id: model/hub.py)."""
    path = cfg.model.tokenizer_path or cfg.model.llm_path or cfg.model.pretrained_path
    if path is None:
        raise ValueError("model.tokenizer_path is not set (and no LLM or pretrained directory to take it from)")
    tokenizer = load_tokenizer(resolve(path, "the tokenizer's path"), model_max_length=cfg.data.model_max_length)
    return tokenizer, prepare_tokenizer(tokenizer)


def build_model(cfg: Config, special_ids: TokenizerIds, *, meta: bool = False) -> Llava:
    """The model on the host in fp32 (FSDP's MixedPrecisionPolicy casts for compute), vocabulary grown to
    hold the tokenizer's added tokens, image and pad ids taken from the tokenizer.

    meta: for a checkpoint source, the model on the meta device with the loading deferred to
    `sharded_load.parallelize_and_load` (the multi-rank path); the configuration and file errors a
    full load would raise before reading tensors still raise here, tensor errors raise at that load."""
    m = cfg.model
    token_ids = {"image_token_id": special_ids.image_token_id, "pad_token_id": special_ids.pad_token_id}
    if m.source == "scratch":
        text = m.architecture.text
        text = replace(text, vocab_size=max(text.vocab_size, special_ids.vocab_size))
        return Llava.from_config(replace(m.architecture, text=text, **token_ids), seed=m.init_seed, backends=m.backends)
    if meta:
        from ..model.hf import plan_components, plan_llava
        from .sharded_load import meta_model

        if m.source == "components":
            plan = plan_components(Path(m.vision_path), Path(m.llm_path), m.projector_weights, seed=m.init_seed,
                                   image_token_id=special_ids.image_token_id, **m.connector())
        else:
            plan = plan_llava(Path(m.pretrained_path), projector_weights=m.projector_weights)
        model = meta_model(plan, Llava, m.backends, special_ids.vocab_size)
    elif m.source == "components":
        model = Llava.from_components(m.vision_path, m.llm_path, projector_weights=m.projector_weights,
                                      dtype=torch.float32, seed=m.init_seed, backends=m.backends,
                                      image_token_id=special_ids.image_token_id, **m.connector())
    else:
        model = Llava.from_pretrained(m.pretrained_path, dtype=torch.float32, backends=m.backends)
        if m.projector_weights is not None:
            model.load_projector(m.projector_weights)
    if not meta:
        model.resize_token_embeddings(special_ids.vocab_size)
    model.config.image_token_id = special_ids.image_token_id
    model.config.pad_token_id = special_ids.pad_token_id
    return model


def build_image_processor(cfg: Config, model: Llava) -> Preprocess:
    """How the tower's images are preprocessed: the preprocessor_config.json that data.image_processor names (the
    file, a directory holding it, or a Hub id: that file alone is fetched), else the one in the tower's
    directory (model.vision_path) or the checkpoint's (model.pretrained_path), else the tower family's processor
    (model/families/) at its image_size. For an AnyRes model this is the per-tile processor: a
    LlavaNextImageProcessor file gives its own, and its pinpoints must be the model's."""
    m, size = cfg.model, model.config.vision.image_size
    tower, _ = families_of(model.config)
    if cfg.data.image_processor is not None:
        path = resolve(cfg.data.image_processor, "data.image_processor", files=(PREPROCESSOR_FILE,))
        file = path / PREPROCESSOR_FILE if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"data.image_processor {cfg.data.image_processor}: {path} holds no {PREPROCESSOR_FILE}")
        return _tile_processor(file, model) or Preprocess.from_file(file, size)
    key = {"components": "vision_path", "pretrained": "pretrained_path"}.get(m.source)
    if key is None:
        return Preprocess.default(tower.image_processor, size)
    directory = resolve(getattr(m, key), f"model.{key}")
    return (_tile_processor(directory / PREPROCESSOR_FILE, model)
            or Preprocess.from_dir(directory, tower.image_processor, size))


def _tile_processor(file: Path, model: Llava) -> Preprocess | None:
    """The per-tile processor of a LlavaNextImageProcessor file (anyres_images.llava_next_processor), else None."""
    grid = model.config.anyres
    spec = llava_next_processor(file, model.config.vision.image_size, None if grid is None else grid.pinpoints,
                                "model.architecture.image_grid_pinpoints / config.json")
    return None if spec is None else spec.processor


def build_dataset(cfg: Config, tokenizer, model: Llava) -> LlavaDataset:
    """The LlavaDataset of data.*, with the model's image size, tokens per image and image processor."""
    d = cfg.data
    if d.data_path is None:
        raise ValueError("data.data_path is not set: give a LLaVA-format JSON/JSONL file (and data.image_folder)")
    # Before any data is read: a window shorter than the longest sample would stop the run at its first long pack.
    model.config.text.check_length(d.model_max_length, "data.model_max_length (the longest sample)")
    grid = model.config.anyres
    if (d.image_mode == "anyres") != (grid is not None):
        raise ValueError(f"data.image_mode={d.image_mode!r} but the model's image_grid_pinpoints are "
                         f"{model.config.image_grid_pinpoints} (model.architecture.image_grid_pinpoints, or the "
                         "checkpoint's config.json): an AnyRes model (pinpoints set) needs data.image_mode=anyres, "
                         "and data.image_mode=anyres needs one")
    processor = build_image_processor(cfg, model)
    loader = (partial(load_image, processor=processor) if grid is None else anyres_loader(processor, grid))
    return LlavaDataset(d.data_path, d.image_folder, tokenizer, d.template, image_mode=d.image_mode,
                        image_size=model.config.vision.image_size, num_image_tokens=model.num_image_tokens,
                        model_max_length=d.model_max_length, overlong=d.overlong, strict=d.strict,
                        rejects_path=d.rejects_path, image_loader=loader, anyres=grid)
