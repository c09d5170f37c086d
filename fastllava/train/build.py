"""Turn a Config into the things the loop needs: tokenizer, dataset, model (before FSDP), and the final export.

Every rank builds the whole model on the host (identical on every rank: same files or same seed) and
`parallelize` then keeps only its shards. For 7B/13B that costs host memory per rank for a moment;
meta-device construction with sharded loading is the next step if it ever matters.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config
from .distributed import DistEnv, barrier


def demo_paths(cfg: Config, env: DistEnv):
    """The synthetic demo dataset: generated once into data.cache_dir (rank 0 first, the others then reuse it)."""
    from ..data.synthetic import make_demo_dataset

    root = Path(cfg.data.cache_dir) / f"demo-{cfg.data.synthetic_size}-seed{cfg.train.seed}"
    if env.is_main:
        paths = make_demo_dataset(root, n_train=cfg.data.synthetic_size, seed=cfg.train.seed)
    barrier()
    if not env.is_main:
        paths = make_demo_dataset(root, n_train=cfg.data.synthetic_size, seed=cfg.train.seed)
    return paths


def resolve_data(cfg: Config, env: DistEnv) -> dict:
    """data_path / image_folder / tokenizer directory (+ eval file for the demo)."""
    if cfg.data.kind == "synthetic":
        paths = demo_paths(cfg, env)
        train_json = paths.pretrain_json if cfg.train.stage == "align" else paths.train_json
        return {"data_path": str(train_json), "image_folder": str(paths.image_folder),
                "tokenizer": str(paths.tokenizer_dir), "eval_json": str(paths.eval_json),
                "captions": cfg.model.vision_pretrain_data or str(paths.pretrain_json)}
    tokenizer = cfg.model.tokenizer_path or cfg.model.llm_path or cfg.model.pretrained_path
    if tokenizer is None:
        raise ValueError("set model.tokenizer_path (no LLM or pretrained directory to take the tokenizer from)")
    if cfg.model.vision_pretrain_steps and not cfg.model.vision_pretrain_data:
        raise ValueError("model.vision_pretrain_steps > 0 needs model.vision_pretrain_data (a LLaVA-format caption "
                         "file) unless data.kind is synthetic")
    return {"data_path": cfg.data.data_path, "image_folder": cfg.data.image_folder, "tokenizer": tokenizer,
            "eval_json": None, "captions": cfg.model.vision_pretrain_data}


def build_tokenizer(cfg: Config, tokenizer_dir: str):
    from ..data.tokenize import load_tokenizer, prepare_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, model_max_length=cfg.data.model_max_length)
    return tokenizer, prepare_tokenizer(tokenizer)


def build_model(cfg: Config, ids):
    """The model on the host in fp32 (FSDP's MixedPrecisionPolicy casts for compute), vocabulary
    grown to hold the tokenizer's added tokens, image/pad ids set from the tokenizer."""
    from ..model import Llava, LlavaConfig

    m = cfg.model
    backends = dict(attention_backend=m.attention_backend, projector_backend=m.projector_backend,
                    merge_backend=m.merge_backend, loss_backend=m.loss_backend)
    if m.source == "scratch":
        arch = dict(m.architecture)
        text = dict(arch.pop("text", {}))
        text["vocab_size"] = max(int(text.get("vocab_size", 0)), ids.vocab_size)
        try:
            config = LlavaConfig(text=text, **{**arch, **backends, "projector_type": m.projector_type,
                                               "vision_feature_layer": m.vision_feature_layer,
                                               "image_token_id": ids.image_token_id, "pad_token_id": ids.pad_token_id})
        except TypeError as e:
            raise ValueError(f"model.architecture: {e}") from None
        model = Llava.from_config(config, seed=m.init_seed)
    elif m.source == "components":
        model = Llava.from_components(m.vision_path, m.llm_path, projector=m.projector_type,
                                      projector_weights=m.projector_weights, dtype=torch.float32,
                                      seed=m.init_seed, vision_feature_layer=m.vision_feature_layer,
                                      image_token_id=ids.image_token_id, **backends)
        model.resize_token_embeddings(ids.vocab_size)
    else:
        model = Llava.from_pretrained(m.pretrained_path, dtype=torch.float32, **backends)
        model.resize_token_embeddings(ids.vocab_size)
        if m.projector_weights is not None:
            model.load_projector(m.projector_weights)
    model.config.image_token_id = ids.image_token_id
    model.config.pad_token_id = ids.pad_token_id
    return model


def build_dataset(cfg: Config, data: dict, tokenizer, model_config):
    from ..data.dataset import LlavaDataset

    return LlavaDataset(
        data["data_path"], data["image_folder"], tokenizer, cfg.data.template,
        image_mode=cfg.data.image_mode, image_size=model_config.vision.image_size,
        num_image_tokens=model_config.num_image_tokens, model_max_length=cfg.data.model_max_length,
        overlong=cfg.data.overlong, strict=cfg.data.strict, rejects_path=cfg.data.rejects_path,
    )


def export(model, cfg: Config, env: DistEnv, tokenizer=None) -> Path | None:
    """Stage 1: the projector (LLaVA's mm_projector key names). Stage 2: a llava-hf directory that
    transformers loads (+ the tokenizer). Collective: the full state dict is gathered on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..model import Llava

    out = Path(cfg.train.output_dir)
    if cfg.train.stage == "align":
        # Only the projector is needed: gathering it alone keeps stage 1's export tiny.
        state = {f"projector.{n}": (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                 for n, p in model.projector.named_parameters()}
    else:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = None
    if env.is_main:
        if cfg.train.stage == "align":
            with torch.device("meta"):
                shell = Llava(model.config)
            proj = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
            shell.projector.load_state_dict(proj, assign=True)
            path = out / "projector.safetensors"
            shell.save_projector(path)
        else:
            path = out / "final"
            model.save_pretrained(path, state=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(path))
    barrier()
    return path


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1
