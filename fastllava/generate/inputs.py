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

from ..data.anyres_images import AnyRes as AnyResImages
from ..data.anyres_images import llava_next_processor, preprocess_anyres
from ..data.images import PREPROCESSOR_FILE, Preprocess, load_image, pil_decode, preprocess_pil
from ..data.tokenize import load_tokenizer, prepare_tokenizer, tokenize_prompt
from ..model.hub import resolve

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A training run's export records the template it trained on here (train/export.py RUN_FILE, the same name).
RUN_FILE = "fastllava.json"
# For a directory that records none (llava-hf's releases, an export older than the record): LLaVA-1.5's.
DEFAULT_TEMPLATE = "vicuna_v1"


# Where a model directory may hold its chat template, in the order read: a processor's (llava-hf's chat_template.json,
# chat_template.jinja as transformers 5 saves it, older processor_config.json), then its tokenizer's.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json", "tokenizer_config.json")


def model_template(path: str | Path, template: str | None = None) -> str:
    """The conversation template to prompt the model at `path` in: `template` when given, else the one its
    export records (RUN_FILE), else, with a note on stderr that says which and why, the one the chat template it
    ships writes (data/templates.py template_of_chat_template: llava-hf's LLaVA-1.5 and LLaVA-NeXT releases), else
    the one LLaVA's llava/serve/cli.py picks by the model's name for LLaVA-NeXT's Mistral and 34B releases, else
    DEFAULT_TEMPLATE (a model trained in another template answers garbled prompts). ValueError naming the file if
    one is unreadable."""
    from ..data.templates import get_template, template_of_chat_template

    if template is not None:
        return template
    try:
        directory = resolve(path, "--model")
    except ValueError:  # no model there: load_model says so, with no note on a template nothing will use
        return DEFAULT_TEMPLATE
    record = directory / RUN_FILE
    if record.is_file():
        try:
            template = json.loads(record.read_text())["template"]
            get_template(template)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{record}: expected {{\"template\": <a template of fastllava.data.templates>}}, "
                             f"got {record.read_text()[:200]!r} ({e})") from None
        return template
    found = _chat_template(directory)
    if found is None:
        template, why = None, "it ships no chat template"
    else:
        template, why = template_of_chat_template(found[1], _decoder_type(directory))
        why = f"the chat template in {found[0].name} {why}"
    if template is None:
        # LLaVA's own rule (llava/serve/cli.py, on get_model_name_from_path) for the original layout's releases
        parts = str(path).partition("@")[0].strip("/").split("/")
        name = ("_".join(parts[-2:]) if parts[-1].startswith("checkpoint-") else parts[-1]).lower()
        for part, by_name in (("mistral", "mistral_instruct"), ("v1.6-34b", "chatml_direct")):
            if part in name:
                template = by_name
                why = f"{why}, and its name {name!r} holds {part!r} (LLaVA's llava/serve/cli.py rule)"
                break
    if template is None:
        template, why = DEFAULT_TEMPLATE, f"{why}; LLaVA-1.5's is the default"
    print(f"note: {record} does not name the model's conversation template; prompting in {template}: {why}; pass "
          "--template to choose another", file=sys.stderr)
    return template


def _chat_template(directory: Path) -> tuple[Path, str] | None:
    """(file, Jinja text) of the first chat template in CHAT_TEMPLATE_FILES under `directory`, or None."""
    for file in (directory / name for name in CHAT_TEMPLATE_FILES):
        if not file.is_file():
            continue
        if file.suffix == ".jinja":
            return file, file.read_text()
        try:
            value = json.loads(file.read_text()).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{file}: cannot read it as a JSON object ({e})") from None
        if isinstance(value, list):  # a tokenizer's named templates: [{"name": "default", "template": ...}, ...]
            value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(value, str) and value:
            return file, value
    return None


def _decoder_type(directory: Path) -> str | None:
    """The decoder's model_type in `directory`/config.json (llava-hf's text_config, else the top level)."""
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):  # load_model names a missing or broken config.json
        return None
    text = raw.get("text_config") if isinstance(raw, dict) else None
    return (text.get("model_type") if isinstance(text, dict) else None) or (
        raw.get("model_type") if isinstance(raw, dict) else None)


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


def image_processor(config, path: str | Path | None = None) -> Preprocess | AnyResImages:
    """How the images of a model of LlavaConfig `config` are preprocessed: the preprocessor_config.json in its
    directory `path` if there is one, else its tower family's processor (CLIP's, SigLIP's) at the tower's
    image size, as training chose it for a checkpoint (train/build.py). `path` may be a Hub id. For an AnyRes
    model, the tiling (data/anyres_images.py) at the model's grid pinpoints, around that per-tile processor
    (a LlavaNextImageProcessor's file holds both)."""
    from ..model.families import of as families_of

    tower, _ = families_of(config)
    size = config.vision.image_size
    directory = None if path is None else resolve(path, "--model")
    if config.anyres is None:
        return (Preprocess.default(tower.image_processor, size) if directory is None
                else Preprocess.from_dir(directory, tower.image_processor, size))
    file = None if directory is None else directory / PREPROCESSOR_FILE
    if file is None or not file.is_file():
        return AnyResImages(Preprocess.default(tower.image_processor, size), config.anyres.pinpoints)
    spec = llava_next_processor(file, size, config.anyres.pinpoints, "config.json")
    return spec or AnyResImages(Preprocess.from_file(file, size), config.anyres.pinpoints)  # a tower's, tiled


def load_pixels(images: Sequence[str | Path | Image.Image], size: int,
                processor: Preprocess | None = None) -> torch.Tensor | None:
    """(n, 3, size, size) float32 of image files or decoded PIL images, padded to square as LLaVA-1.5
    does (image_aspect_ratio "pad"); None for no image. processor: the tower's (image_processor); default
    CLIP's."""
    if not images:
        return None
    return torch.stack([preprocess_pil(im.convert("RGB"), "pad", size, processor) if isinstance(im, Image.Image)
                        else load_image(im, mode="pad", size=size, processor=processor) for im in images])


def load_anyres_pixels(images: Sequence[str | Path | Image.Image], spec: AnyResImages) -> dict:
    """{"pixel_values": (n_tiles, 3, S, S) float32 or None, "image_sizes": [(height, width), ...]} of image files
    or decoded PIL images for an AnyRes model: each image's base image and tiles in turn (data/anyres_images.py),
    and its size as decoded (EXIF orientation applied), from which the model counts its visual tokens."""
    p = spec.processor
    decoded = [im.convert("RGB") if isinstance(im, Image.Image) else pil_decode(im, "anyres", p.size, p)
               for im in images]
    return {"pixel_values": torch.cat([preprocess_anyres(im, spec) for im in decoded]) if decoded else None,
            "image_sizes": [(im.height, im.width) for im in decoded]}


def make_prompt(turns: Sequence[dict], images: Sequence, tokenizer, model, template: str,
                processor: Preprocess | AnyResImages | None = None) -> dict:
    """The generator's prompt for a conversation that ends with a human turn: {"input_ids", "pixel_values"}
    (and "image_sizes" for an AnyRes model). turns: [{"from": "human"|"gpt", "value": str}, ...] with one <image>
    tag per image. template: the one the model was trained in (model_template). processor:
    image_processor(model.config, its directory); default its tower family's (tiled at the model's grid)."""
    processor = processor or image_processor(model.config)
    ids = tokenize_prompt(turns, tokenizer, template)
    if model.config.anyres is not None:
        if not isinstance(processor, AnyResImages):
            raise TypeError(f"an AnyRes model's images are tiled: pass image_processor(model.config, ...)'s "
                            f"tiling, not a {type(processor).__name__}")
        return {"input_ids": ids, **load_anyres_pixels(images, processor)}
    return {"input_ids": ids, "pixel_values": load_pixels(images, model.config.vision.image_size, processor)}


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
