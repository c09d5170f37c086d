"""Shared setup of the training tests: a tiny Llava (fastllava.testing) and an in-memory dataset with the
LlavaDataset interface (lengths() and __getitem__ -> input_ids / labels / pixel_values), deterministic per
index, and the Config of such runs."""

from __future__ import annotations

import numpy as np
import torch

from fastllava.config import load_config
from fastllava.testing import tiny_config as tiny_architecture
from fastllava.testing import tiny_model as _tiny_model

IMAGE_TOKEN = 299
PAD = 0
VOCAB = 300
IMAGE_SIZE = 28
NUM_IMAGE_TOKENS = 4  # (28 / 14)^2
ARCHITECTURE = tiny_architecture(vision={"num_hidden_layers": 2, "num_attention_heads": 2},
                                 text={"vocab_size": VOCAB, "intermediate_size": 128, "num_key_value_heads": 2},
                                 vision_feature_layer=-1, image_token_id=IMAGE_TOKEN, pad_token_id=PAD)


def tiny_model(seed: int = 0):
    return _tiny_model(ARCHITECTURE, seed=seed)


class ToyDataset:
    """n samples; every `text_every`-th is text-only; lengths 6..29 raw tokens; first third is prompt."""

    def __init__(self, n: int, seed: int = 0, text_every: int = 5):
        self.n, self.seed, self.text_every = n, seed, text_every

    def __len__(self) -> int:
        return self.n

    def _raw(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        length = int(torch.randint(6, 30, (1,), generator=g))
        ids = torch.randint(1, IMAGE_TOKEN, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 3] = -100
        has_image = i % self.text_every != 0
        pixels = None
        if has_image:
            ids[0] = IMAGE_TOKEN
            labels[0] = -100
            pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        return ids, labels, pixels

    def lengths(self) -> np.ndarray:
        out = []
        for i in range(self.n):
            ids, _, pixels = self._raw(i)
            out.append(len(ids) + (NUM_IMAGE_TOKENS - 1 if pixels is not None else 0))
        return np.asarray(out, dtype=np.int64)

    def __getitem__(self, i: int) -> dict:
        ids, labels, pixels = self._raw(i)
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "id": str(i)}


def tiny_config(out_dir, *overrides: str):
    """A Config for the toy runs: fp32 on CPU, no progress display, model and data passed in by the test."""
    return load_config(None, [
        "model.source=scratch", "model.architecture={}",
        "data.max_tokens_per_pack=64", "data.model_max_length=64", "data.num_workers=0",
        "train.global_batch_size=8", "train.device=cpu", f"train.output_dir={out_dir}",
        "optim.lr=1e-3", "optim.warmup_ratio=0.0", "optim.weight_decay=0.01",
        "parallel.activation_checkpointing=none", "logging.progress=false", "checkpoint.every_steps=0",
        *overrides,
    ])


def run(cfg, model=None, dataset=None):
    """Train `model` (default tiny_model()) on `dataset` as `cfg` says; returns the TrainResult."""
    from fastllava.train import Trainer

    return Trainer(cfg, model or tiny_model(), dataset).run()
