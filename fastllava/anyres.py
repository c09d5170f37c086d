"""LLaVA-NeXT's AnyRes geometry: which grid an image is tiled at and how many visual tokens it becomes.

Pure integer and float arithmetic on image sizes, no pixels and nothing of fastllava, so the data side
(tiles, sample lengths from image headers) and the model side (unpadding the feature grid) share one
definition. Every function reproduces transformers' LlavaNext (5.x) exactly, including its float
rounding, because a count that differs by one token from the model's breaks the merge of a pack:

  select_best_resolution  image_processing_utils.select_best_resolution
  resized_shape           image_processing_utils.get_patch_output_size (the resize before the pad)
  grid_shape              modeling_llava_next.get_anyres_image_grid_shape
  unpadded_shape          modeling_llava_next.unpad_image (on the feature grid)
  num_image_tokens        processing_llava_next.LlavaNextProcessor._get_number_of_features, less the CLS

Conventions: sizes are (height, width) in pixels, as transformers' image_sizes; `pinpoints` are the
config's image_grid_pinpoints, (height, width) pairs in pixels, each a multiple of the tile side;
`tile` is the tower's image_size (336 for CLIP-336); `side` is patches per tile side (336 // 14 = 24).
The original LLaVA-NeXT code reads each pinpoint as (width, height); the default set is symmetric, so
only exact ties between a pinpoint and its transpose (small square images) can choose differently.
"""

from __future__ import annotations

import math

# LLaVA-NeXT's (v1.6) default grid: 1x2, 2x1, 2x2, 1x3 and 3x1 tiles of 336 px
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def _size(size_hw) -> tuple[int, int]:
    h, w = (int(x) for x in size_hw)
    if h < 1 or w < 1:
        raise ValueError(f"image size (height, width) must be positive, got {tuple(size_hw)}")
    return h, w


def check_pinpoints(pinpoints, tile: int) -> tuple[tuple[int, int], ...]:
    """The pinpoints as a tuple of (height, width) int pairs; ValueError unless there is at least one and
    every one is a positive multiple of `tile` (the tiles must cover it exactly, as the model assumes)."""
    try:
        pairs = tuple((int(h), int(w)) for h, w in pinpoints)
    except (TypeError, ValueError):
        raise ValueError(f"image_grid_pinpoints must be a list of [height, width] pairs, got {pinpoints!r}") from None
    if not pairs:
        raise ValueError("image_grid_pinpoints is empty: give at least one [height, width] resolution")
    bad = [p for p in pairs if min(p) < 1]
    if bad:
        raise ValueError(f"image_grid_pinpoints {bad}: every height and width must be positive")
    bad = [p for p in pairs if min(p) < tile or p[0] % tile or p[1] % tile]
    if bad:
        raise ValueError(f"image_grid_pinpoints {bad} are not positive multiples of the tower's image_size {tile} "
                         "(each resolution must be a whole number of tiles)")
    return pairs


def select_best_resolution(size_hw, pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) an image of `size_hw` is resized into: the most of the image's pixels
    kept after a fit-inside downscale (capped at the image's own count), then the least canvas wasted;
    the first in list order wins exact ties."""
    h, w = _size(size_hw)
    best, best_kept, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)  # same float expressions as transformers: int() of these decides ties
        kept = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (ph, pw), kept, waste
    if best is None:
        raise ValueError("image_grid_pinpoints is empty: give at least one [height, width] resolution")
    return best


def resized_shape(size_hw, target_hw) -> tuple[int, int]:
    """(height, width) of the image resized to fit inside `target_hw` keeping its aspect ratio: the limiting
    side is the target's, the other ceil(side * scale), at most the target's (get_patch_output_size)."""
    h, w = _size(size_hw)
    th, tw = target_hw
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), th), tw  # the float product, as transformers rounds it
    return th, min(math.ceil(w * scale_h), tw)


def pad_offsets(resized_hw, target_hw) -> tuple[int, int]:
    """(top, left) of the resized image on the black target canvas: centred, the odd pixel after it."""
    return (target_hw[0] - resized_hw[0]) // 2, (target_hw[1] - resized_hw[1]) // 2


def grid_shape(size_hw, pinpoints, tile: int) -> tuple[int, int]:
    """(rows, cols) of `tile` x `tile` tiles at the image's best resolution."""
    ph, pw = select_best_resolution(size_hw, check_pinpoints(pinpoints, tile))
    return ph // tile, pw // tile


def num_tiles(size_hw, pinpoints, tile: int) -> int:
    """Images the tower encodes for one picture: the downscaled whole image plus rows * cols tiles."""
    rows, cols = grid_shape(size_hw, pinpoints, tile)
    return 1 + rows * cols


def unpadded_shape(size_hw, height: int, width: int) -> tuple[int, int]:
    """(h, w) left of a `height` x `width` feature grid (rows * side, cols * side) once the rows or columns
    that only saw the black padding are cut, as unpad_image does: the image's extent on the grid is
    int(round(x, 7)) of its scaled side, and (grid - extent) // 2 is cut from EACH end, so an odd
    difference keeps one padded row or column."""
    h, w = _size(size_hw)
    if w / h > width / height:  # wider than the grid: padding above and below
        extent = int(round(h * (width / w), 7))
        return height - (height - extent) // 2 * 2, width
    extent = int(round(w * (height / h), 7))
    return height, width - (width - extent) // 2 * 2


def num_image_tokens(size_hw, pinpoints, tile: int, side: int, *, newline: bool = True) -> int:
    """Visual tokens of one image: side * side of the base image, then the unpadded grid of the tiles'
    features, each of its rows ended by the learned image_newline when `newline` (LlavaNext's
    spatial_unpad). side: patches per tile side after the feature select ("default" drops the CLS)."""
    rows, cols = grid_shape(size_hw, pinpoints, tile)
    h, w = unpadded_shape(size_hw, rows * side, cols * side)
    return side * side + h * (w + int(newline))

