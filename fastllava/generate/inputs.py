"""What generation reads: a trained model directory with its tokenizer, and prompts built from turns and
images exactly as training built its samples (one tokenization, LLaVA's; images padded to square)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..data.images import load_image, preprocess_pil
from ..data.tokenize import load_tokenizer, prepare_tokenizer, tokenize_prompt

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(path: str | Path, *, dtype: str = "auto", device: str | torch.device = "auto"):
    """(model, tokenizer) from a llava-hf (or original LLaVA) directory that holds its tokenizer.

    dtype: "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16". device: a torch.device, or a name
    read as training reads it (train.distributed.local_device: auto, cpu or cuda). The tokenizer's <image>
    id must be the model's image token id."""
    from ..model import Llava
    from ..train.distributed import local_device

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--model {path}: {'not a directory' if path.exists() else 'does not exist'} (expected "
                         "a llava-hf directory, e.g. a training run's <output_dir>/final)")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {path}: no config.json there (expected a llava-hf directory, e.g. a "
                         "training run's <output_dir>/final)")
    dev = device if isinstance(device, torch.device) else local_device(device)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of auto, {', '.join(DTYPES)}")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {path}: cannot load its tokenizer ({e})") from None
    model = Llava.from_pretrained(path, dtype=DTYPES[dtype], device=dev).eval()
    ids = prepare_tokenizer(tokenizer)
    if ids.image_token_id != model.config.image_token_id:
        raise ValueError(f"{path}: the tokenizer's <image> is id {ids.image_token_id} but config.json says "
                         f"{model.config.image_token_id}")
    return model, tokenizer


def load_pixels(images: Sequence[str | Path | Image.Image], size: int) -> torch.Tensor | None:
    """(n, 3, size, size) float32 of image files or decoded PIL images, padded to square as LLaVA-1.5
    does (image_aspect_ratio "pad"); None for no image."""
    if not images:
        return None
    return torch.stack([preprocess_pil(im.convert("RGB"), "pad", size) if isinstance(im, Image.Image)
                        else load_image(im, mode="pad", size=size) for im in images])


def make_prompt(turns: Sequence[dict], images: Sequence, tokenizer, model, template: str = "vicuna_v1") -> dict:
    """The generator's prompt for a conversation that ends with a human turn: {"input_ids", "pixel_values"}.
    turns: [{"from": "human"|"gpt", "value": str}, ...] with one <image> tag per image."""
    return {"input_ids": tokenize_prompt(turns, tokenizer, template),
            "pixel_values": load_pixels(images, model.config.vision.image_size)}


class StreamDecoder:
    """Text of a growing list of token ids, piece by piece: `push(ids)` returns what is new since the last
    call. Decoding the whole list each time keeps SentencePiece's spaces right; a trailing U+FFFD (half of
    a multi-byte character spread over byte tokens) is held back until the character completes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def push(self, ids: Sequence[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new
