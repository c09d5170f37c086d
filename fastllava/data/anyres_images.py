"""LLaVA-NeXT's AnyRes pixels: one image -> its base image and grid tiles, (1 + rows * cols, 3, S, S) float32,
as transformers' LlavaNextImageProcessor makes them; and an image file's (height, width) from its header, which
with fastllava.anyres gives the image's visual-token count before any pixel is decoded.

Steps (LlavaNextImageProcessor's get_image_patches, then its per-tile processing, which is CLIP's):
  1. decode as data/images.py does: EXIF orientation applied, RGB, 16-bit scaled; refused above
     images.MAX_IMAGE_PIXELS decoded pixels (besides the decode, AnyRes holds only pinpoint-sized images);
  2. the best grid pinpoint for the image's size (anyres.select_best_resolution); resize into it keeping the
     aspect ratio (anyres.resized_shape), centred on a black canvas of the pinpoint's size (anyres.pad_offsets);
  3. the canvas cut into S x S tiles, row-major; before them the base image: the whole image resized, squashed,
     to the processor's resize side (shortest_edge, or size for a processor without a crop);
  4. each of the 1 + rows * cols images through the tower processor's resize, centre crop and normalization
     (images.preprocess_pil): for tiles already S x S with shortest_edge = S, the normalization only.
S is the tower's image_size; the same resampling filter (bicubic) everywhere, as the processor.

load_anyres_images takes NVIDIA DALI when it is installed, as images.load_images does and for the same files
(images._dali_ready): DALI decodes, makes the canvas of step 2 and the base image, and normalizes; the host
cuts the canvas into tiles (a view). Only for processors whose tiles need no resize (shortest_edge = size, or
no crop: every LLaVA-NeXT checkpoint's). DALI resizes as Pillow does (images.dali_resize): within 2 uint8
levels inside the resized image, more at its borders (docs/data.md, tests/data/test_anyres.py). Images carry a
different number of tiles each: a batch is a list.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import ExifTags, Image

from .. import anyres
from .images import Preprocess, pil_decode, preprocess_pil
# the DALI path shares images.py's checks and routing (which files DALI decodes exactly as Pillow does)
from .images import _check_args, _dali_device, _dali_ready, _DALI_FILTERS, _open, _use_dali, dali_resize, pillow_passes

_DEFAULT = Preprocess()  # _open's processor: unused in mode "anyres", whose limit is the decoded pixels'
_pipelines: dict = {}  # (batch size, device, threads, processor) -> a built DALI pipeline, as images.py's
_RESIZES = ("resize_1", "resize_2", "base_1", "base_2")  # the DALI pipeline's resize sizes, in pillow_passes' order

# Orientations 5-8 turn the image a quarter: its (height, width) swap (ImageOps.exif_transpose's table)
_QUARTER_TURNS = {5, 6, 7, 8}


@dataclass(frozen=True)
class AnyRes:
    """What LlavaNextImageProcessor does, as data: the tower's per-tile processor and the grid pinpoints,
    (height, width) pairs in pixels, each a whole number of processor.size tiles."""

    processor: Preprocess = Preprocess()
    pinpoints: tuple[tuple[int, int], ...] = anyres.DEFAULT_PINPOINTS

    def __post_init__(self):
        object.__setattr__(self, "pinpoints", anyres.check_pinpoints(self.pinpoints, self.processor.size))

    @classmethod
    def from_hf(cls, raw: dict, size: int, where: str) -> "AnyRes":
        """From a LlavaNextImageProcessor's preprocessor_config.json dict (size: the tower's image_size; the
        fields it leaves out take the class's defaults, CLIP's, and LLaVA-NeXT's default pinpoints).
        ValueError naming `where` for anything Preprocess.from_hf refuses or bad pinpoints."""
        kind = raw.get("image_processor_type") or ""
        if kind.removesuffix("Fast").removesuffix("Pil") != "LlavaNextImageProcessor":
            raise ValueError(f"{where}: image_processor_type {kind!r}, expected LlavaNextImageProcessor (AnyRes)")
        # its per-tile steps and defaults are CLIPImageProcessor's (transformers' class attributes)
        processor = Preprocess.from_hf({**raw, "image_processor_type": "CLIPImageProcessor"}, size, where)
        try:
            return cls(processor, raw.get("image_grid_pinpoints") or anyres.DEFAULT_PINPOINTS)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def num_tiles(self, size_hw) -> int:
        """Images the tower encodes for an image of size_hw (height, width): the base image and the tiles."""
        return anyres.num_tiles(size_hw, self.pinpoints, self.processor.size)


def llava_next_processor(file: Path, size: int, pinpoints, where: str) -> AnyRes | None:
    """The AnyRes of a LlavaNextImageProcessor's preprocessor_config.json `file` (a llava-hf LLaVA-NeXT
    directory's), None when there is no such file or it is another processor's. size: the tower's image_size;
    pinpoints: the model's, (height, width) pairs, None for a fixed-resolution model; where: where the model's
    come from, for the message. ValueError naming the file when it is not JSON or its pinpoints are not the
    model's: its tiles would not match the model's visual tokens."""
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read it as JSON ({e})") from None
    if "LlavaNext" not in str(raw.get("image_processor_type")):
        return None
    spec = AnyRes.from_hf(raw, size, str(file))
    if pinpoints is None or spec.pinpoints != tuple(map(tuple, pinpoints)):
        theirs, model = [list(p) for p in spec.pinpoints], None if pinpoints is None else [list(p) for p in pinpoints]
        raise ValueError(f"{file}: a LlavaNextImageProcessor at image_grid_pinpoints {theirs}, but the model's are "
                         f"{model} ({where}): the tiles would not match its visual tokens")
    return spec


def tiles_pil(img: Image.Image, spec: AnyRes) -> list[Image.Image]:
    """Steps 2-3 on a decoded RGB image: [base image, tiles row-major], before the tower processor's steps."""
    p, tile = spec.processor, spec.processor.size
    target_h, target_w = anyres.select_best_resolution((img.height, img.width), spec.pinpoints)
    new_h, new_w = anyres.resized_shape((img.height, img.width), (target_h, target_w))
    top, left = anyres.pad_offsets((new_h, new_w), (target_h, target_w))
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(img.resize((new_w, new_h), resample=p.resample), (left, top))
    base_side = p.shortest_edge or p.size
    out = [img.resize((base_side, base_side), resample=p.resample)]
    out += [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, target_h, tile) for x in range(0, target_w, tile)]
    return out


def preprocess_anyres(img: Image.Image, spec: AnyRes) -> torch.Tensor:
    """A decoded RGB image -> (1 + rows * cols, 3, S, S) float32: the base image, then the tiles row-major."""
    p = spec.processor
    return torch.stack([preprocess_pil(t, "square", p.size, p) for t in tiles_pil(img, spec)])


def load_anyres(path, spec: AnyRes) -> torch.Tensor:
    """Decode and tile one image file (see the module docstring); ImageError naming the file on failure."""
    p = spec.processor
    return preprocess_anyres(pil_decode(path, "anyres", p.size, p), spec)


def load_anyres_images(paths: Sequence, spec: AnyRes, backend: str = "auto",
                       num_threads: int | None = None) -> list[torch.Tensor]:
    """load_anyres of each path, a list since every image has its own number of tiles. backend as
    images.load_images: "auto" takes DALI when it is installed, CUDA is available and DALI matches the
    processor (its filter, and tiles that the processor does not resize: shortest_edge = size, or no crop),
    Pillow otherwise."""
    p = spec.processor
    _check_args("square", p.size, backend, p)  # the backend's name, DALI installed, its filter
    if backend == "dali" and p.shortest_edge not in (None, p.size):
        raise ValueError(f"image backend 'dali' tiles only for a processor that does not resize its tiles (here "
                         f"shortest_edge {p.shortest_edge}, size {p.size}): use backend 'pil' or 'auto'")
    out: list = [None] * len(paths)
    if _use_dali(backend, p) and p.shortest_edge in (None, p.size):
        _load_dali(paths, spec, out, num_threads or min(4, os.cpu_count() or 1))
    return [load_anyres(path, spec) if tiles is None else tiles for path, tiles in zip(paths, out)]


# ----------------------------------------------------------------------------- DALI


def _dali_pipeline(batch_size: int, device: str, num_threads: int, processor: Preprocess):
    """Decode; resize into the pinpoint and centre on its black canvas; resize the whole image to the base;
    normalize both. The host cuts the canvas into tiles (a view): no per-tile work in DALI."""
    key = (batch_size, device, num_threads, processor)
    if key in _pipelines:
        return _pipelines[key]
    from nvidia.dali import fn, pipeline_def, types

    mean, std = [255.0 * m for m in processor.mean], [255.0 * s for s in processor.std]
    interp = getattr(types, _DALI_FILTERS[processor.resample])
    side = processor.size

    @pipeline_def(batch_size=batch_size, num_threads=num_threads,
                  device_id=torch.cuda.current_device() if device == "mixed" else None,
                  prefetch_queue_depth=1, exec_dynamic=True)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, batch=True)
        # (2,) float32 each: pillow_passes' sizes of the resize into the pinpoint, and of the base image's
        resize_1, resize_2, base_1, base_2 = (fn.external_source(name=n, batch=True) for n in _RESIZES)
        pad_start = fn.external_source(name="pad_start", batch=True)  # (2,) int32 -top, -left
        pad_shape = fn.external_source(name="pad_shape", batch=True)  # (2,) int32 the pinpoint's h, w
        img = fn.decoders.image(encoded, device=device, output_type=types.RGB, adjust_orientation=False)
        grid = dali_resize(img, resize_1, resize_2, interp)
        grid = fn.slice(grid, start=pad_start, shape=pad_shape, axis_names="HW", out_of_bounds_policy="pad",
                        fill_values=[0, 0, 0])
        base = dali_resize(img, base_1, base_2, interp)
        return tuple(fn.crop_mirror_normalize(x, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")
                     for x in (base, grid))

    built = pipe()
    built.build()
    _pipelines[key] = built
    return built


def _load_dali(paths: Sequence, spec: AnyRes, out: list, num_threads: int) -> None:
    """Fill out[i] for every path DALI can take (images._dali_ready: what it decodes as Pillow does)."""
    p, side = spec.processor, spec.processor.size
    ready = {i: r for i, path in enumerate(paths) if (r := _dali_ready(path, "anyres", p)) is not None}
    if not ready:
        return
    feeds = {k: [] for k in ("encoded", "pad_start", "pad_shape", *_RESIZES)}
    for data, (w, h) in ready.values():
        target = anyres.select_best_resolution((h, w), spec.pinpoints)
        resized = anyres.resized_shape((h, w), target)
        top, left = anyres.pad_offsets(resized, target)
        feeds["encoded"].append(np.frombuffer(data, dtype=np.uint8))
        passes = pillow_passes((h, w), resized) + pillow_passes((h, w), (side, side))
        for name, size in zip(_RESIZES, passes):
            feeds[name].append(size)
        feeds["pad_start"].append(np.array([-top, -left], np.int32))
        feeds["pad_shape"].append(np.array(target, np.int32))
    device = _dali_device()
    pipe = _dali_pipeline(len(ready), device, num_threads, p)
    try:
        for name, batch in feeds.items():
            pipe.feed_input(name, batch)
        base, grid = pipe.run()
    except RuntimeError as e:  # as images._load_dali: the pipeline is unusable; Pillow redoes the batch
        _pipelines.pop((len(ready), device, num_threads, p), None)
        warnings.warn(f"DALI failed on a batch of {len(ready)} images, redoing it with Pillow: {str(e)[:300]}",
                      stacklevel=3)
        return
    if device == "mixed":
        base, grid = base.as_cpu(), grid.as_cpu()
    for k, i in enumerate(ready):
        canvas = torch.from_numpy(np.array(grid[k]))  # (3, rows * S, cols * S)
        rows, cols = canvas.shape[1] // side, canvas.shape[2] // side
        tiles = canvas.view(3, rows, side, cols, side).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, side, side)
        out[i] = torch.cat([torch.from_numpy(np.array(base[k]))[None], tiles])


# ----------------------------------------------------------------------------- sizes from headers


def image_size(path) -> tuple[int, int]:
    """(height, width) of the image as the decode path gives it (EXIF orientation applied), read from the
    file's header, without decoding pixels. ImageError naming the file if its header cannot be read, or if
    the decode path would refuse it (above images.MAX_IMAGE_PIXELS): no count for an image never loaded."""
    with _open(path, "anyres", _DEFAULT) as img:
        width, height = img.size
        exif_of = Image.Image.getexif  # the metadata read at open: eXIf before the pixels, XMP, TIFF tags
        if img.format == "PNG" and "exif" not in img.info and _png_metadata_after_pixels(path):
            exif_of = type(img).getexif  # PNG's decodes the pixels to reach chunks after them (rare files)
        try:
            orientation = exif_of(img).get(ExifTags.Base.Orientation, 1)
        except (OSError, SyntaxError, ValueError, EOFError):
            orientation = 1  # unreadable metadata: the decode path then fails on the file and names it
        if img.format == "TIFF" and img.size != (img.tag_v2.get(256), img.tag_v2.get(257)):
            orientation = 1  # Pillow's TIFF plugin (13.0) reports the size already turned, and turns at load
    return (width, height) if orientation in _QUARTER_TURNS else (height, width)


def _png_metadata_after_pixels(path) -> bool:
    """Whether a PNG has an eXIf or text chunk (XMP can carry an orientation) after its first IDAT: chunk
    headers only, no decompression."""
    with open(path, "rb") as f:
        f.seek(8)  # the signature
        seen_pixels = False
        while header := f.read(8):
            if len(header) < 8:
                return False
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IEND":
                return False
            seen_pixels |= kind == b"IDAT"
            if seen_pixels and kind in (b"eXIf", b"iTXt", b"tEXt", b"zTXt"):
                return True
            f.seek(length + 4, 1)  # the data and its CRC
    return False


def image_sizes(paths: Sequence) -> list[tuple[int, int]]:
    """image_size of each path."""
    return [image_size(Path(p)) for p in paths]
