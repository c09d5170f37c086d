"""Image preprocessing as LLaVA does it, with the tower's image processor (transformers' CLIPImageProcessor or
SiglipImageProcessor), on NVIDIA DALI when installed, on Pillow otherwise.

Output: (3, size, size) float32, normalized with the processor's mean/std. Steps, as LLaVA + the processor:
  1. decode; apply EXIF orientation (LLaVA does not: see docs/data.md); convert to RGB the way
     PIL's .convert("RGB") does, i.e. alpha is DROPPED, not composited (LLaVA's behaviour);
     16-bit images are scaled to 8 bits (PIL's convert would clip them to white);
  2. mode="pad" (stage 2, image_aspect_ratio=pad): paste onto a square canvas of the processor's mean
     colour (int(255 * mean) per channel) at offset (long - short) // 2; mode="square" (stage 1): no padding;
  3. CLIP: resize the shortest side to `shortest_edge`, long side int(shortest_edge * long / short) (CLIP
     truncates), then centre crop size x size at offset (dim - size) // 2. SigLIP: resize to size x size
     (no crop). Bicubic unless the processor's preprocessor_config.json says otherwise;
  4. scale to [0, 1]; normalize.
`Preprocess` holds what differs between processors (read from a preprocessor_config.json by `from_hf`);
the functions below take one as `processor`, default CLIP's at `size` (LLaVA-1.5's).

The DALI path computes the geometry of steps 2-3 on the host (from the image header) and hands DALI
exact sizes and offsets, because DALI's own resize_shorter/centre crop round differently. Images that
DALI would treat differently from Pillow (alpha, palette, CMYK, 16-bit, EXIF-rotated, files without
an end marker) go through Pillow, and so does every image of a processor whose resampling filter DALI
has no match for (backend "dali" refuses it). A missing, corrupt or truncated file raises ImageError
naming it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from ..extras import MissingExtra

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104), LLaVA's expand2square fill
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SiglipImageProcessor's (IMAGENET_STANDARD_MEAN / _STD)

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
# Pillow's filters that DALI's antialiased resize matches (DALI_*_ATOL of the tests); the others go to Pillow
_DALI_FILTERS = {int(Image.Resampling.BICUBIC): "INTERP_CUBIC", int(Image.Resampling.BILINEAR): "INTERP_LINEAR"}
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


# ----------------------------------------------------------------------------- the processor

PREPROCESSOR_FILE = "preprocessor_config.json"  # transformers' name, in tower and llava-hf directories
_FILTERS = {int(f): f.name.lower() for f in Image.Resampling}
# image_processor_type -> (centre crop, mean, std) when preprocessor_config.json leaves them out: the class
# defaults of transformers' processors ("...Fast" and "...Pil" are the same processor on other backends).
_PROCESSORS = {"CLIPImageProcessor": (True, CLIP_MEAN, CLIP_STD), "CLIPFeatureExtractor": (True, CLIP_MEAN, CLIP_STD),
               "SiglipImageProcessor": (False, SIGLIP_MEAN, SIGLIP_STD)}


@dataclass(frozen=True)
class Preprocess:
    """What a tower's image processor does, as data (steps 2-4 of the module docstring).

    size: the output side, the tower's image_size. shortest_edge: CLIPImageProcessor's resize of the
    shortest side to it, then the centre crop of size x size (shortest_edge >= size); None:
    SiglipImageProcessor's resize straight to size x size, no crop. mean, std: per channel, on [0, 1]
    values; mode "pad" fills with int(255 * mean), LLaVA's expand2square(image_processor.image_mean).
    resample: a PIL filter (Image.Resampling), bicubic for both towers' processors."""

    size: int = 336
    shortest_edge: int | None = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.shortest_edge is not None and self.shortest_edge < self.size:
            raise ValueError(f"shortest_edge {self.shortest_edge} is below the crop size {self.size}: the crop would "
                             "leave the resized image (CLIPImageProcessor pads it with zeros; not supported)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must have 3 values each, std > 0; got {self.mean}, {self.std}")
        if self.resample not in _FILTERS:
            raise ValueError(f"resample {self.resample!r} is not a PIL filter; choose one of {_FILTERS}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """LLaVA's expand2square fill: (122, 116, 104) for CLIP, (127, 127, 127) for SigLIP."""
        return tuple(int(x * 255) for x in self.mean)

    @classmethod
    def from_hf(cls, raw: dict, size: int, where: str) -> "Preprocess":
        """From a preprocessor_config.json dict of a CLIPImageProcessor or SiglipImageProcessor (fields it leaves
        out take the class's defaults; size: the tower's image_size, the default output side). ValueError
        naming `where` for another processor, or one whose output is not size x size."""
        raw = {k: v for k, v in raw.items() if v is not None}  # transformers writes some unset fields as null
        kind = raw.get("image_processor_type") or raw.get("feature_extractor_type") or ""
        kind = kind.removesuffix("Fast").removesuffix("Pil")
        if kind not in _PROCESSORS:
            raise ValueError(f"{where}: image_processor_type {kind!r}, expected one of {', '.join(_PROCESSORS)} "
                             "(the fixed-resolution processors of the CLIP and SigLIP towers)")
        crop, mean, std = _PROCESSORS[kind]
        for key, want in (("do_resize", True), ("do_rescale", True), ("do_normalize", True)):
            if raw.get(key, want) is not want:
                raise ValueError(f"{where}: {key} {raw[key]!r} is not supported (expected {want})")
        if abs(raw.get("rescale_factor", 1 / 255) * 255 - 1) > 1e-6:
            raise ValueError(f"{where}: rescale_factor {raw['rescale_factor']} is not supported (expected 1/255)")
        crop = raw.get("do_center_crop", crop)
        resize, side = _side(raw.get("size", {"shortest_edge": size} if crop else {"height": size, "width": size}),
                             "size", where)
        out = side
        if crop:
            crop_kind, out = _side(raw.get("crop_size", size), "crop_size", where)
            if crop_kind != "square" or resize == "square" and out != side:
                raise ValueError(f"{where}: size {raw.get('size')!r} then a centre crop of {raw.get('crop_size')!r} "
                                 "is not supported (expected a square crop after a shortest-edge resize)")
        elif resize != "square":
            raise ValueError(f"{where}: a shortest-edge resize without a centre crop gives images that are not "
                             "square; not supported")
        if out != size:
            raise ValueError(f"{where}: the processor gives {out}x{out} images but the tower takes {size}x{size} "
                             "(its image_size): fix one of the two")
        try:
            return cls(size=out, shortest_edge=side if resize == "shortest_edge" else None,
                       mean=tuple(raw.get("image_mean", mean)), std=tuple(raw.get("image_std", std)),
                       resample=int(raw.get("resample", Image.Resampling.BICUBIC)))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def default(cls, processor_type: str, size: int) -> "Preprocess":
        """The `processor_type` processor's defaults at the tower's image_size (what a checkpoint without a
        preprocessor_config.json gets: its tower family's processor, model/families/)."""
        return cls.from_hf({"image_processor_type": processor_type}, size, f"{processor_type}'s defaults")

    @classmethod
    def from_file(cls, path, size: int) -> "Preprocess":
        """From a preprocessor_config.json file (see from_hf)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read it as JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_hf(raw, size, str(path))

    @classmethod
    def from_dir(cls, directory, default_type: str, size: int) -> "Preprocess":
        """The processor of a model or tower directory: its preprocessor_config.json if it has one, else the
        `default_type` processor's defaults (e.g. "SiglipImageProcessor") at the tower's image_size `size`."""
        path = Path(directory) / PREPROCESSOR_FILE
        return cls.from_file(path, size) if path.is_file() else cls.default(default_type, size)

    def to_hf(self) -> dict:
        """The preprocessor_config.json of the transformers processor that does the same."""
        crop = self.shortest_edge is not None
        sides = ({"size": {"shortest_edge": self.shortest_edge}, "crop_size": {"height": self.size, "width": self.size}}
                 if crop else {"size": {"height": self.size, "width": self.size}})
        return {"image_processor_type": "CLIPImageProcessor" if crop else "SiglipImageProcessor",
                "do_resize": True, "do_center_crop": crop, **sides, "resample": self.resample, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(self.mean),
                "image_std": list(self.std), "do_convert_rgb": True}


def _side(value, key: str, where: str) -> tuple[str, int]:
    """("shortest_edge" | "square", side) of a processor's size / crop_size (an int is the shortest edge for
    size, the square side for crop_size, as transformers reads them)."""
    if isinstance(value, int):
        return ("shortest_edge" if key == "size" else "square", value)
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if v is not None}
    if isinstance(value, dict) and set(value) == {"shortest_edge"}:
        return "shortest_edge", value["shortest_edge"]
    if isinstance(value, dict) and set(value) == {"height", "width"} and value["height"] == value["width"]:
        return "square", value["height"]
    raise ValueError(f"{where}: {key} {value!r} is not supported (expected {{'shortest_edge': n}} or a square "
                     "{'height': n, 'width': n})")


def _processor(size: int, processor: Preprocess | None) -> Preprocess:
    """`processor`, or CLIP's at `size` (LLaVA-1.5's); ValueError if the two disagree on the output size."""
    if processor is None:
        return Preprocess(size=size, shortest_edge=size)
    if processor.size != size:
        raise ValueError(f"size {size} but the processor gives {processor.size}x{processor.size} images")
    return processor


# ----------------------------------------------------------------------------- geometry


def resize_geometry(width: int, height: int, mode: str, size: int, processor: Preprocess | None = None):
    """Host-side geometry of steps 2-3 for a (width, height) image after EXIF orientation.

    Returns (pad_box, resized, crop): pad_box = (x0, y0, side_w, side_h) the region of the padded
    canvas taken from the image (x0, y0 <= 0 when padding), resized = (w, h) after the resize,
    crop = (left, top) of the size x size centre crop ((0, 0) for a processor without a crop).
    """
    p = _processor(size, processor)
    if mode == "pad" and width != height:
        side = max(width, height)
        x0, y0 = -((side - width) // 2), -((side - height) // 2)
        width = height = side
    else:
        x0 = y0 = 0
    if p.shortest_edge is None:  # SiglipImageProcessor: straight to size x size
        return (x0, y0, width, height), (size, size), (0, 0)
    short, long, edge = min(width, height), max(width, height), p.shortest_edge
    new_long = int(edge * long / short)
    new_w, new_h = (edge, new_long) if width <= height else (new_long, edge)
    return (x0, y0, width, height), (new_w, new_h), ((new_w - size) // 2, (new_h - size) // 2)


def _check_args(mode: str, size: int, backend: str, processor: Preprocess | None) -> Preprocess:
    """The processor of a call (see _processor), after checking the call's arguments."""
    if mode not in _MODES:
        raise ValueError(f"mode must be 'pad' (stage 2) or 'square' (stage 1), got {mode!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if backend not in ("auto", "dali", "pil"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'pil', got {backend!r}")
    p = _processor(size, processor)
    if backend == "dali" and not HAS_DALI:
        raise MissingExtra("image backend 'dali'", "nvidia.dali", _DALI_ERROR)
    if backend == "dali" and p.resample not in _DALI_FILTERS:
        raise ValueError(f"image backend 'dali' has no match for Pillow's {_FILTERS[p.resample]} resampling (only "
                         f"{' and '.join(_FILTERS[f] for f in _DALI_FILTERS)}): use backend 'pil', or 'auto', which "
                         "takes Pillow for such a processor")
    return p


# ----------------------------------------------------------------------------- Pillow


def _open(path, mode: str, processor: Preprocess) -> Image.Image:
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
        _check_pixels(path, img.width, img.height, mode, processor)
    except ImageError:
        img.close()
        raise
    return img


def _check_pixels(path, width: int, height: int, mode: str, processor: Preprocess) -> None:
    """ImageError unless every image that preprocessing a width x height one holds has at most
    MAX_IMAGE_PIXELS pixels."""
    if width < 1 or height < 1:
        raise ImageError(path, f"empty image {width}x{height}")
    held = [(width * height, "")]
    if mode != "anyres":  # AnyRes (anyres_images.py) holds the decode and a canvas of a pinpoint's size only
        (_, _, side_w, side_h), resized, _ = resize_geometry(width, height, mode, processor.size, processor)
        held += [(side_w * side_h, f" padded to {side_w}x{side_h} in mode 'pad'"),
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


def pil_decode(path, mode: str = "square", size: int = 336, processor: Preprocess | None = None) -> Image.Image:
    """Decode fully to an RGB PIL image with EXIF orientation applied; ImageError on any failure, and
    before decoding when preprocessing it (`mode`, `processor`; "anyres": data/anyres_images.py) would hold
    more than MAX_IMAGE_PIXELS."""
    img = _open(path, mode, _processor(size, processor))
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


@lru_cache(maxsize=None)
def _affine(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 - mean) / std as one float32 multiply-add x * scale + shift: within 1e-6 of transformers'
    float64 rescale + float32 normalize, and about 3x cheaper than doing it in float64."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(3, 1, 1)
    return scale, shift


def _normalize(hwc_u8: np.ndarray, processor: Preprocess) -> torch.Tensor:
    chw = torch.from_numpy(np.array(hwc_u8)).permute(2, 0, 1).float()  # copy: PIL arrays are read-only
    scale, shift = _affine(processor.mean, processor.std)
    return (chw * scale + shift).contiguous()


def preprocess_pil(img: Image.Image, mode: str = "pad", size: int = 336,
                   processor: Preprocess | None = None) -> torch.Tensor:
    """Steps 2-4 on a decoded RGB image -> (3, size, size) float32."""
    p = _processor(size, processor)
    if mode == "pad":
        img = expand2square(img, p.pad_color)
    _, (new_w, new_h), (left, top) = resize_geometry(img.width, img.height, "square", size, p)
    img = img.resize((new_w, new_h), resample=p.resample)
    pixels = np.asarray(img)[top : top + size, left : left + size]
    return _normalize(pixels, p)


# ----------------------------------------------------------------------------- DALI


def _dali_device() -> str:
    return "mixed" if torch.cuda.is_available() else "cpu"


def pillow_passes(in_hw, out_hw) -> tuple[np.ndarray, np.ndarray]:
    """dali_resize's two one-axis sizes for an in_hw -> out_hw (height, width) resize, in the order Pillow 13.0
    resamples in: (h, 0) and (0, w) float32, a 0 keeping the input's extent. Pillow goes height first when the
    height shrinks and the width grows, width first otherwise; in two passes whose intermediate is uint8, the
    order shows on high-contrast images (up to 26 levels apart on noise). Checked (2026-12-06) on 350 random
    resizes of noise images and 450 of LLaVA's geometries: Pillow's order every time but for images shrunk
    along both axes, 26% of which (of 300) Pillow takes height first by a rule not found here."""
    (in_h, in_w), (h, w) = in_hw, out_hw
    width, height = np.array([0, w], np.float32), np.array([h, 0], np.float32)
    return (height, width) if h < in_h and w > in_w else (width, height)


def dali_resize(img, first, second, interp):
    """DALI's antialiased resize of `img` (a DALI HWC uint8 node) as Pillow resizes: one axis, its result
    rounded and clipped to uint8, then the other; first, second: pillow_passes' sizes ((2,) float32 nodes or
    lists). A single fn.resize keeps its intermediate in float, so where Pillow clips the cubic's overshoot
    between its passes (high contrast: noise, sharp edges) the two differed by up to 22 uint8 levels inside
    the image, and by 0.2 of a level on average on smooth images (under 0.05 in two passes). What is left is at the
    image's borders: Pillow renormalizes the kernel that the edge cuts, DALI repeats the edge pixel."""
    from nvidia.dali import fn

    for size in (first, second):  # mode "stretch": a 0 extent keeps the input's
        img = fn.resize(img, size=size, mode="stretch", interp_type=interp, antialias=True)
    return img


def _dali_pipeline(batch_size: int, device: str, num_threads: int, processor: Preprocess):
    key = (batch_size, device, num_threads, processor)
    if key in _pipelines:
        return _pipelines[key]
    from nvidia.dali import fn, pipeline_def, types

    mean = [255.0 * m for m in processor.mean]
    std = [255.0 * s for s in processor.std]
    interp = getattr(types, _DALI_FILTERS[processor.resample])

    @pipeline_def(batch_size=batch_size, num_threads=num_threads,
                  device_id=torch.cuda.current_device() if device == "mixed" else None,
                  prefetch_queue_depth=1, exec_dynamic=True)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, batch=True)
        pad_start = fn.external_source(name="pad_start", batch=True)  # (2,) int32 y, x
        pad_shape = fn.external_source(name="pad_shape", batch=True)  # (2,) int32 h, w
        resize_1 = fn.external_source(name="resize_1", batch=True)  # (2,) float32: pillow_passes' sizes
        resize_2 = fn.external_source(name="resize_2", batch=True)
        crop_start = fn.external_source(name="crop_start", batch=True)  # (2,) int32 y, x
        crop_shape = fn.external_source(name="crop_shape", batch=True)  # (2,) int32 size, size
        img = fn.decoders.image(encoded, device=device, output_type=types.RGB, adjust_orientation=False)
        img = fn.slice(img, start=pad_start, shape=pad_shape, axis_names="HW",
                       out_of_bounds_policy="pad", fill_values=list(processor.pad_color))
        img = dali_resize(img, resize_1, resize_2, interp)
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


def _dali_ready(path, mode: str, processor: Preprocess):
    """(encoded bytes, (w, h)) if DALI can decode this file exactly as Pillow would, else None."""
    img = _open(path, mode, processor)  # ImageError for missing or unreadable headers and bombs, with the path
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


def _load_dali(paths: Sequence, mode: str, processor: Preprocess, out: list, num_threads: int) -> None:
    """Fill out[i] for every path DALI can take; leave the others None."""
    size = processor.size
    ready = {i: r for i, p in enumerate(paths) if (r := _dali_ready(p, mode, processor)) is not None}
    if not ready:
        return
    idx = list(ready)
    feeds = {k: [] for k in ("encoded", "pad_start", "pad_shape", "resize_1", "resize_2", "crop_start", "crop_shape")}
    for i in idx:
        data, (w, h) = ready[i]
        (x0, y0, side_w, side_h), (new_w, new_h), (left, top) = resize_geometry(w, h, mode, size, processor)
        feeds["encoded"].append(np.frombuffer(data, dtype=np.uint8))
        feeds["pad_start"].append(np.array([y0, x0], np.int32))
        feeds["pad_shape"].append(np.array([side_h, side_w], np.int32))
        feeds["resize_1"].append((passes := pillow_passes((side_h, side_w), (new_h, new_w)))[0])
        feeds["resize_2"].append(passes[1])
        feeds["crop_start"].append(np.array([top, left], np.int32))
        feeds["crop_shape"].append(np.array([size, size], np.int32))
    device = _dali_device()
    pipe = _dali_pipeline(len(idx), device, num_threads, processor)
    try:
        for name, batch in feeds.items():
            pipe.feed_input(name, batch)
        (result,) = pipe.run()
    except RuntimeError as e:
        # A DALI error leaves the pipeline unusable; Pillow redoes the batch and names a bad file.
        _pipelines.pop((len(idx), device, num_threads, processor), None)
        warnings.warn(f"DALI failed on a batch of {len(idx)} images, redoing it with Pillow: {str(e)[:300]}",
                      stacklevel=3)
        return
    if device == "mixed":
        result = result.as_cpu()
    for k, i in enumerate(idx):
        out[i] = torch.from_numpy(np.array(result[k]))


# ----------------------------------------------------------------------------- public API


def load_images(paths: Sequence, mode: str = "pad", size: int = 336, backend: str = "auto",
                num_threads: int | None = None, processor: Preprocess | None = None) -> torch.Tensor:
    """Load and preprocess a batch -> (N, 3, size, size) float32 with `processor` (default CLIP's at
    `size`). backend "auto" uses DALI's GPU decoding ("mixed") when DALI is installed, CUDA is available and
    DALI matches the processor's resampling, Pillow otherwise; "dali" uses DALI on the CPU too."""
    p = _check_args(mode, size, backend, processor)
    if not paths:
        return torch.empty(0, 3, size, size)
    out: list = [None] * len(paths)
    if _use_dali(backend, p):
        _load_dali(paths, mode, p, out, num_threads or min(4, os.cpu_count() or 1))
    for i, path in enumerate(paths):
        if out[i] is None:
            out[i] = preprocess_pil(pil_decode(path, mode, size, p), mode, size, p)
    return torch.stack(out)


def load_image(path, mode: str = "pad", size: int = 336, backend: str = "auto",
               processor: Preprocess | None = None) -> torch.Tensor:
    """Load and preprocess one image -> (3, size, size) float32 (see the module docstring)."""
    p = _check_args(mode, size, backend, processor)
    if not _use_dali(backend, p):
        return preprocess_pil(pil_decode(path, mode, size, p), mode, size, p)
    return load_images([path], mode, size, backend, processor=p)[0]


def _use_dali(backend: str, processor: Preprocess) -> bool:
    # "auto" takes DALI only for its GPU decoder: on CPU, Pillow is exact and was faster than DALI's
    # two-pass resize (189 against 84 images/s per thread, docs/data.md); "dali" asks for it anyway.
    return (backend == "dali" or (backend == "auto" and torch.cuda.is_available())) and HAS_DALI \
        and processor.resample in _DALI_FILTERS
