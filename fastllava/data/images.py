"""CLIP image preprocessing as LLaVA does it, on NVIDIA DALI when installed, on Pillow otherwise.

Output: (3, size, size) float32, normalized with CLIP's mean/std. Steps, as LLaVA + CLIPImageProcessor:
  1. decode; apply EXIF orientation (LLaVA does not: see docs/data.md); convert to RGB the way
     PIL's .convert("RGB") does, i.e. alpha is DROPPED, not composited (LLaVA's behaviour);
     16-bit images are scaled to 8 bits (PIL's convert would clip them to white);
  2. mode="pad" (stage 2, image_aspect_ratio=pad): paste onto a square canvas of the CLIP mean colour
     (int(255 * mean) per channel) at offset (long - short) // 2; mode="square" (stage 1): no padding;
  3. resize the shortest side to `size`, long side int(size * long / short) (CLIP truncates), bicubic;
  4. centre crop size x size at offset (dim - size) // 2; scale to [0, 1]; normalize.

The DALI path computes the geometry of steps 2-4 on the host (from the image header) and hands DALI
exact sizes and offsets, because DALI's own resize_shorter/centre crop round differently. Images that
DALI would treat differently from Pillow (alpha, palette, CMYK, 16-bit, EXIF-rotated, files without
an end marker) go through Pillow. A missing, corrupt or truncated file raises ImageError naming it.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from ..extras import MissingExtra

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104), LLaVA's expand2square fill

# Decompression bombs and huge images: an image is refused from its header, before anything is
# decoded, when an image its preprocessing holds exceeds this many pixels: the decoded one, the pad
# canvas (side = the long side) or the resized one before the crop (long side scaled by size / short).
# A 12000 x 8 strip, 96 K pixels and 200 bytes on disk, pads to 144 M or resizes to 504000 x 336.
# 2**26 (67 M pixels, 192 MiB as RGB) keeps decode + canvas + resize of one image under ~0.5 GB per
# loader worker (8 workers x 8 ranks share a node's memory), and is far above LLaVA-1.5's images
# (COCO's are at most 640 px on a side, the largest of the mix a few thousand); a 48 MP photo
# (8000 x 6000, 64 M pixels padded) loads. Preprocessing for much larger sources (AnyRes tiles of
# scanned pages) may raise it: it is read at every call; set it before the loader's workers start.
MAX_IMAGE_PIXELS = 1 << 26

_MODES = ("pad", "square")
# DALI reads a whole file into memory: only files of plausible size for their pixels go to it. An 8-bit
# RGB JPEG or PNG is at most ~3 bytes a pixel plus its metadata (EXIF, ICC, XMP segments).
_MAX_FILE_BYTES_PER_PIXEL = 4
_MAX_METADATA_BYTES = 16 << 20
_DALI_MODES = {"RGB", "L"}  # decoded identically by DALI; anything else goes through Pillow
_pipelines: dict = {}

try:
    import nvidia.dali  # noqa: F401

    _DALI_ERROR = None
except ImportError as e:  # backend "auto" goes through Pillow, as the docstring says; "dali" is an error
    _DALI_ERROR = e
HAS_DALI = _DALI_ERROR is None


class ImageError(ValueError):
    """An image that cannot be used; `path` names it (the dataset adds the sample id)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        super().__init__(f"image {self.path}: {reason}")


# ----------------------------------------------------------------------------- geometry


def resize_geometry(width: int, height: int, mode: str, size: int):
    """Host-side geometry of steps 2-4 for a (width, height) image after EXIF orientation.

    Returns (pad_box, resized, crop): pad_box = (x0, y0, side_w, side_h) the region of the padded
    canvas taken from the image (x0, y0 <= 0 when padding), resized = (w, h) after the shortest-side
    resize, crop = (left, top) of the size x size centre crop.
    """
    if mode == "pad" and width != height:
        side = max(width, height)
        x0, y0 = -((side - width) // 2), -((side - height) // 2)
        width = height = side
    else:
        x0 = y0 = 0
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    return (x0, y0, width, height), (new_w, new_h), ((new_w - size) // 2, (new_h - size) // 2)


def _check_args(mode: str, size: int, backend: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be 'pad' (stage 2) or 'square' (stage 1), got {mode!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if backend not in ("auto", "dali", "pil"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'pil', got {backend!r}")
    if backend == "dali" and not HAS_DALI:
        raise MissingExtra("image backend 'dali'", "nvidia.dali", _DALI_ERROR)


# ----------------------------------------------------------------------------- Pillow


def _open(path, mode: str, size: int) -> Image.Image:
    """Open lazily (the header only) and refuse what _check_pixels refuses, before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except Image.DecompressionBombError as e:  # above twice Pillow's own limit: ours is lower anyway
        raise ImageError(path, f"refused before decoding, a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, f"cannot identify or read the image ({e})") from None
    try:
        _check_pixels(path, img.width, img.height, mode, size)
    except ImageError:
        img.close()
        raise
    return img


def _check_pixels(path, width: int, height: int, mode: str, size: int) -> None:
    """ImageError unless every image that preprocessing a width x height one holds has at most
    MAX_IMAGE_PIXELS pixels."""
    if width < 1 or height < 1:
        raise ImageError(path, f"empty image {width}x{height}")
    (_, _, side_w, side_h), resized, _ = resize_geometry(width, height, mode, size)
    held = [(width * height, ""), (side_w * side_h, f" padded to {side_w}x{side_h} in mode 'pad'"),
            (resized[0] * resized[1], f" resized to {resized[0]}x{resized[1]} before the centre crop")]
    pixels, stage = max(held, key=lambda h: h[0])  # the first of equals: the decoded image's own size
    if pixels > MAX_IMAGE_PIXELS:
        raise ImageError(path, f"{width}x{height}{stage} is {pixels:,} pixels, above "
                               f"fastllava.data.images.MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS:,}: refused before "
                               "decoding, a possible decompression bomb")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (PNG/TIFF): PIL's convert("RGB") clips at 255, i.e. white; scale instead.
        # Mode "I" holds 16-bit PNGs in recent Pillow; values above 65535 are clipped.
        wide = np.asarray(img, dtype=np.float64).clip(0, 65535)
        img = Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), mode="L")
    with warnings.catch_warnings():
        # P with transparency: PIL warns that alpha is lost, which is LLaVA's behaviour (documented).
        warnings.simplefilter("ignore", UserWarning)
        return img.convert("RGB")


def pil_decode(path, mode: str = "square", size: int = 336) -> Image.Image:
    """Decode fully to an RGB PIL image with EXIF orientation applied; ImageError on any failure, and
    before decoding when preprocessing it (`mode`, `size`) would hold more than MAX_IMAGE_PIXELS."""
    img = _open(path, mode, size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()  # a truncated file raises here (Pillow's LOAD_TRUNCATED_IMAGES stays False)
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(path, f"corrupt or truncated ({e})") from None


def expand2square(img: Image.Image, fill=PAD_COLOR) -> Image.Image:
    """LLaVA's pad step: the image centred on a square canvas of `fill`."""
    (x0, y0, side_w, side_h), _, _ = resize_geometry(img.width, img.height, "pad", 1)
    if side_w == img.width and side_h == img.height:
        return img
    canvas = Image.new(img.mode, (side_w, side_h), fill)
    canvas.paste(img, (-x0, -y0))
    return canvas


# (x / 255 - mean) / std as one float32 multiply-add: within 1e-6 of transformers' float64 rescale +
# float32 normalize, and about 3x cheaper than doing it in float64.
_SCALE = torch.tensor([1.0 / (255.0 * s) for s in CLIP_STD], dtype=torch.float32).view(3, 1, 1)
_SHIFT = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], dtype=torch.float32).view(3, 1, 1)


def _normalize(hwc_u8: np.ndarray) -> torch.Tensor:
    chw = torch.from_numpy(np.array(hwc_u8)).permute(2, 0, 1).float()  # copy: PIL arrays are read-only
    return (chw * _SCALE + _SHIFT).contiguous()


def preprocess_pil(img: Image.Image, mode: str = "pad", size: int = 336) -> torch.Tensor:
    """Steps 2-4 on a decoded RGB image -> (3, size, size) float32."""
    if mode == "pad":
        img = expand2square(img)
    _, (new_w, new_h), (left, top) = resize_geometry(img.width, img.height, "square", size)
    img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(img)[top : top + size, left : left + size]
    return _normalize(pixels)


# ----------------------------------------------------------------------------- DALI


def _dali_device() -> str:
    return "mixed" if torch.cuda.is_available() else "cpu"


def _dali_pipeline(batch_size: int, device: str, num_threads: int):
    key = (batch_size, device, num_threads)
    if key in _pipelines:
        return _pipelines[key]
    from nvidia.dali import fn, pipeline_def, types

    mean = [255.0 * m for m in CLIP_MEAN]
    std = [255.0 * s for s in CLIP_STD]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads,
                  device_id=torch.cuda.current_device() if device == "mixed" else None,
                  prefetch_queue_depth=1, exec_dynamic=True)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, batch=True)
        pad_start = fn.external_source(name="pad_start", batch=True)  # (2,) int32 y, x
        pad_shape = fn.external_source(name="pad_shape", batch=True)  # (2,) int32 h, w
        resize_hw = fn.external_source(name="resize", batch=True)  # (2,) float32 h, w
        crop_start = fn.external_source(name="crop_start", batch=True)  # (2,) int32 y, x
        crop_shape = fn.external_source(name="crop_shape", batch=True)  # (2,) int32 size, size
        img = fn.decoders.image(encoded, device=device, output_type=types.RGB, adjust_orientation=False)
        img = fn.slice(img, start=pad_start, shape=pad_shape, axis_names="HW",
                       out_of_bounds_policy="pad", fill_values=list(PAD_COLOR))
        img = fn.resize(img, size=resize_hw, interp_type=types.INTERP_CUBIC, antialias=True)
        img = fn.slice(img, start=crop_start, shape=crop_shape, axis_names="HW")
        return fn.crop_mirror_normalize(img, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")

    built = pipe()
    built.build()
    _pipelines[key] = built
    return built


def _has_end_marker(data: bytes, fmt: str | None) -> bool:
    # DALI's decoders fill a truncated JPEG with grey instead of failing; such files go to Pillow,
    # which raises. Valid files with trailing bytes after the marker only take the slower path.
    tail = data[-64:]
    if fmt == "JPEG":
        return b"\xff\xd9" in tail
    if fmt == "PNG":
        return b"IEND" in tail
    return False


def _dali_ready(path, mode: str, size: int):
    """(encoded bytes, (w, h)) if DALI can decode this file exactly as Pillow would, else None."""
    img = _open(path, mode, size)  # ImageError for missing or unreadable headers and bombs, with the path
    if img.format not in ("JPEG", "PNG") or img.mode not in _DALI_MODES or "transparency" in img.info:
        return None
    try:
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: leave rotations to Pillow
            return None
    except (OSError, SyntaxError, ValueError, EOFError):
        return None  # unreadable metadata: Pillow decodes it and names the file if it is broken
    size, fmt = img.size, img.format
    img.close()
    if os.path.getsize(path) > _MAX_FILE_BYTES_PER_PIXEL * size[0] * size[1] + _MAX_METADATA_BYTES:
        return None  # far more bytes than pixels (trailing data?): Pillow reads only what it decodes
    with open(path, "rb") as f:
        data = f.read()
    return (data, size) if _has_end_marker(data, fmt) else None


def _load_dali(paths: Sequence, mode: str, size: int, out: list, num_threads: int) -> None:
    """Fill out[i] for every path DALI can take; leave the others None."""
    ready = {i: r for i, p in enumerate(paths) if (r := _dali_ready(p, mode, size)) is not None}
    if not ready:
        return
    idx = list(ready)
    feeds = {k: [] for k in ("encoded", "pad_start", "pad_shape", "resize", "crop_start", "crop_shape")}
    for i in idx:
        data, (w, h) = ready[i]
        (x0, y0, side_w, side_h), (new_w, new_h), (left, top) = resize_geometry(w, h, mode, size)
        feeds["encoded"].append(np.frombuffer(data, dtype=np.uint8))
        feeds["pad_start"].append(np.array([y0, x0], np.int32))
        feeds["pad_shape"].append(np.array([side_h, side_w], np.int32))
        feeds["resize"].append(np.array([new_h, new_w], np.float32))
        feeds["crop_start"].append(np.array([top, left], np.int32))
        feeds["crop_shape"].append(np.array([size, size], np.int32))
    device = _dali_device()
    pipe = _dali_pipeline(len(idx), device, num_threads)
    try:
        for name, batch in feeds.items():
            pipe.feed_input(name, batch)
        (result,) = pipe.run()
    except RuntimeError as e:
        # A DALI error leaves the pipeline unusable; Pillow redoes the batch and names a bad file.
        _pipelines.pop((len(idx), device, num_threads), None)
        warnings.warn(f"DALI failed on a batch of {len(idx)} images, redoing it with Pillow: {str(e)[:300]}",
                      stacklevel=3)
        return
    if device == "mixed":
        result = result.as_cpu()
    for k, i in enumerate(idx):
        out[i] = torch.from_numpy(np.array(result[k]))


# ----------------------------------------------------------------------------- public API


def load_images(paths: Sequence, mode: str = "pad", size: int = 336, backend: str = "auto",
                num_threads: int | None = None) -> torch.Tensor:
    """Load and preprocess a batch -> (N, 3, size, size) float32. backend "auto" uses DALI when it is
    installed ("mixed" GPU decoding when CUDA is available, CPU otherwise), Pillow otherwise."""
    _check_args(mode, size, backend)
    if not paths:
        return torch.empty(0, 3, size, size)
    out: list = [None] * len(paths)
    if backend != "pil" and HAS_DALI:
        _load_dali(paths, mode, size, out, num_threads or min(4, os.cpu_count() or 1))
    for i, p in enumerate(paths):
        if out[i] is None:
            out[i] = preprocess_pil(pil_decode(p, mode, size), mode, size)
    return torch.stack(out)


def load_image(path, mode: str = "pad", size: int = 336, backend: str = "auto") -> torch.Tensor:
    """Load and preprocess one image -> (3, size, size) float32 (see the module docstring)."""
    _check_args(mode, size, backend)
    if backend == "pil" or not HAS_DALI:
        return preprocess_pil(pil_decode(path, mode, size), mode, size)
    return load_images([path], mode, size, backend)[0]
