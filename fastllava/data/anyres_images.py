"""LLaVA-NeXT's AnyRes pixels: one image -> its base image and grid tiles, (1 + rows * cols, 3, S, S) float32,
as transformers' LlavaNextImageProcessor makes them; and an image file's (height, width) from its header, which
with fastllava.anyres gives the image's visual-token count before any pixel is decoded.

Steps (LlavaNextImageProcessor's get_image_patches, then its per-tile processing, which is CLIP's):
  1. decode as data/images.py does: EXIF orientation applied, RGB, 16-bit scaled; refused above
     images.MAX_IMAGE_PIXELS decoded pixels (AnyRes never holds more: it only scales down into a pinpoint);
  2. the best grid pinpoint for the image's size (anyres.select_best_resolution); resize into it keeping the
     aspect ratio (anyres.resized_shape), centred on a black canvas of the pinpoint's size (anyres.pad_offsets);
  3. the canvas cut into S x S tiles, row-major; before them the base image: the whole image resized, squashed,
     to the processor's resize side (shortest_edge, or size for a processor without a crop);
  4. each of the 1 + rows * cols images through the tower processor's resize, centre crop and normalization
     (images.preprocess_pil): for tiles already S x S with shortest_edge = S, the normalization only.
S is the tower's image_size; the same resampling filter (bicubic) everywhere, as the processor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import ExifTags, Image

from .. import anyres
from .images import Preprocess, open_header, pil_decode, preprocess_pil

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


def load_anyres_images(paths: Sequence, spec: AnyRes) -> list[torch.Tensor]:
    """load_anyres of each path: a list, since every image has its own number of tiles."""
    return [load_anyres(path, spec) for path in paths]


# ----------------------------------------------------------------------------- sizes from headers


def image_size(path) -> tuple[int, int]:
    """(height, width) of the image as the decode path gives it (EXIF orientation applied), read from the
    file's header, without decoding pixels. ImageError naming the file if its header cannot be read."""
    with open_header(path) as img:
        width, height = img.size
        exif_of = Image.Image.getexif  # the metadata read at open: eXIf before the pixels, XMP, TIFF tags
        if img.format == "PNG" and "exif" not in img.info and _png_metadata_after_pixels(path):
            exif_of = type(img).getexif  # PNG's decodes the pixels to reach chunks after them (rare files)
        try:
            orientation = exif_of(img).get(ExifTags.Base.Orientation, 1)
        except (OSError, SyntaxError, ValueError, EOFError):
            orientation = 1  # unreadable metadata: the decode path then fails on the file and names it
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
