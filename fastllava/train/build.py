"""A Config's tokenizer, model (before FSDP) and dataset: what the Trainer is constructed from.

Every rank builds the whole model on the host (identical on every rank: same files or same seed) and
`parallelize` then keeps only its shards. For 7B/13B that costs host memory per rank for a moment;
meta-device construction with sharded loading is the next step if it ever matters.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import Config
from ..data.dataset import LlavaDataset
from ..data.tokenize import TokenizerIds, load_tokenizer, prepare_tokenizer
from ..model import Llava


def build_tokenizer(cfg: Config):
    """(tokenizer, its special-token ids) from model.tokenizer_path, else the LLM's or checkpoint's directory."""
    path = cfg.model.tokenizer_path or cfg.model.llm_path or cfg.model.pretrained_path
    if path is None:
        raise ValueError("model.tokenizer_path is not set (and no LLM or pretrained directory to take it from)")
    tokenizer = load_tokenizer(path, model_max_length=cfg.data.model_max_length)
    return tokenizer, prepare_tokenizer(tokenizer)


def build_model(cfg: Config, special_ids: TokenizerIds) -> Llava:
    """The model on the host in fp32 (FSDP's MixedPrecisionPolicy casts for compute), vocabulary grown to
    hold the tokenizer's added tokens, image and pad ids taken from the tokenizer."""
    m = cfg.model
    token_ids = {"image_token_id": special_ids.image_token_id, "pad_token_id": special_ids.pad_token_id}
    if m.source == "scratch":
        text = m.architecture.text
        text = replace(text, vocab_size=max(text.vocab_size, special_ids.vocab_size))
        return Llava.from_config(replace(m.architecture, text=text, **token_ids), seed=m.init_seed, backends=m.backends)
    if m.source == "components":
        model = Llava.from_components(m.vision_path, m.llm_path, projector_weights=m.projector_weights,
                                      dtype=torch.float32, seed=m.init_seed, backends=m.backends,
                                      image_token_id=special_ids.image_token_id, **m.connector())
    else:
        model = Llava.from_pretrained(m.pretrained_path, dtype=torch.float32, backends=m.backends)
        if m.projector_weights is not None:
            model.load_projector(m.projector_weights)
    model.resize_token_embeddings(special_ids.vocab_size)
    model.config.image_token_id = special_ids.image_token_id
    model.config.pad_token_id = special_ids.pad_token_id
    return model


def build_dataset(cfg: Config, tokenizer, model: Llava) -> LlavaDataset:
    """The LlavaDataset of data.*, with the model's image size and tokens per image."""
    d = cfg.data
    if d.data_path is None:
        raise ValueError("data.data_path is not set: give a LLaVA-format JSON/JSONL file (and data.image_folder)")
    return LlavaDataset(d.data_path, d.image_folder, tokenizer, d.template, image_mode=d.image_mode,
                        image_size=model.config.vision.image_size, num_image_tokens=model.num_image_tokens,
                        model_max_length=d.model_max_length, overlong=d.overlong, strict=d.strict,
                        rejects_path=d.rejects_path)
