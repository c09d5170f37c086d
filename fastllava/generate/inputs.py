"""What generation reads: a trained model directory with its tokenizer, conversation template and image
processor, and prompts built from turns and images exactly as training built its samples (one tokenization,
LLaVA's; images padded to square in the tower's mean colour and preprocessed as its processor does)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..data.images import Preprocess, load_image, preprocess_pil
from ..data.tokenize import load_tokenizer, prepare_tokenizer, tokenize_prompt
from ..model.hub import resolve

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A training run's export records the template it trained on here (train/export.py RUN_FILE, the same name).
RUN_FILE = "fastllava.json"
# For a directory that records none (llava-hf's releases, an export older than the record): LLaVA-1.5's.
DEFAULT_TEMPLATE = "vicuna_v1"


def model_template(path: str | Path, template: str | None = None) -> str:
    """The conversation template to prompt the model at `path` in: `template` when given, else the one its
    export records, else DEFAULT_TEMPLATE with a note on stderr (a model trained in another template, a Qwen
    model in `qwen`, would answer garbled prompts). ValueError naming the file if it is unreadable."""
    from ..data.templates import get_template

    if template is not None:
        return template
    try:
        record = resolve(path, "--model") / RUN_FILE
    except ValueError:  # no model there: load_model says so, with no note on a template nothing will use
        return DEFAULT_TEMPLATE
    if not record.is_file():
        print(f"note: {record} does not name the model's conversation template; prompting in {DEFAULT_TEMPLATE} "
              "(LLaVA-1.5's): pass --template to choose another", file=sys.stderr)
        return DEFAULT_TEMPLATE
    try:
        template = json.loads(record.read_text())["template"]
        get_template(template)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{record}: expected {{\"template\": <a template of fastllava.data.templates>}}, "
                         f"got {record.read_text()[:200]!r} ({e})") from None
    return template


def load_model(path: str | Path, *, dtype: str = "auto", device: str | torch.device = "auto"):
    """(model, tokenizer) from a llava-hf (or original LLaVA) directory that holds its tokenizer, or the Hub id
    of one (model/hub.py).

    dtype: "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16". device: a torch.device, or a name
    read as training reads it (train.distributed.local_device: auto, cpu or cuda). The tokenizer's <image>
    id must be the model's image token id."""
    from ..model import Llava
    from ..train.distributed import local_device

    path = resolve(path, "--model")
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


def image_processor(config, path: str | Path | None = None) -> Preprocess:
    """How the images of a model of LlavaConfig `config` are preprocessed: the preprocessor_config.json in its
    directory `path` if there is one, else its tower family's processor (CLIP's, SigLIP's) at the tower's
    image size, as training chose it for a checkpoint (train/build.py). `path` may be a Hub id."""
    from ..model.families import of as families_of

    tower, _ = families_of(config)
    if path is None:
        return Preprocess.default(tower.image_processor, config.vision.image_size)
    return Preprocess.from_dir(resolve(path, "--model"), tower.image_processor, config.vision.image_size)


def load_pixels(images: Sequence[str | Path | Image.Image], size: int,
                processor: Preprocess | None = None) -> torch.Tensor | None:
    """(n, 3, size, size) float32 of image files or decoded PIL images, padded to square as LLaVA-1.5
    does (image_aspect_ratio "pad"); None for no image. processor: the tower's (image_processor); default
    CLIP's."""
    if not images:
        return None
    return torch.stack([preprocess_pil(im.convert("RGB"), "pad", size, processor) if isinstance(im, Image.Image)
                        else load_image(im, mode="pad", size=size, processor=processor) for im in images])


def make_prompt(turns: Sequence[dict], images: Sequence, tokenizer, model, template: str,
                processor: Preprocess | None = None) -> dict:
    """The generator's prompt for a conversation that ends with a human turn: {"input_ids", "pixel_values"}.
    turns: [{"from": "human"|"gpt", "value": str}, ...] with one <image> tag per image. template: the one the
    model was trained in (model_template). processor: image_processor(model.config, its directory); default
    its tower family's."""
    size = model.config.vision.image_size
    return {"input_ids": tokenize_prompt(turns, tokenizer, template),
            "pixel_values": load_pixels(images, size, processor or image_processor(model.config))}


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
