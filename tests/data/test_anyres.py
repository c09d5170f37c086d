"""LLaVA-NeXT's AnyRes: the geometry of fastllava/anyres.py against transformers' own functions (the image
processor's select_best_resolution and get_patch_output_size, the model's get_anyres_image_grid_shape,
unpad_image and pack_image_features, the processor's token count) over many image sizes and grids."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_processing_utils import select_best_resolution as hf_best
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next import modeling_llava_next as hf_model
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from fastllava import anyres

# Sizes (height, width): strips 1 x N and N x 1, tiny, very large, each default pinpoint's own shape and
# its halves and doubles, COCO-like photos, odd primes, exact ties (square images below a tile tie
# between 336x672 and 672x336), sizes whose scaled side is an integer that floats land just below
# (55 x 176: 55 * (48 / 176) = 14.999999999999998; unpad_image's round(x, 7) keeps 15, so one row more),
# and 400 log-uniform random sizes from 1 to 20,000 px a side.
_rng = np.random.default_rng(0)
SIZES = sorted({(1, 1), (1, 2), (2, 1), (1, 5000), (5000, 1), (3, 20000), (20000, 3), (20000, 15000), (15000, 20000),
                (336, 336), (200, 200), (168, 336), (336, 168), (480, 640), (640, 480), (427, 640), (640, 427),
                (517, 333), (97, 1025), (1025, 97), (1000, 999), (999, 1000), (2016, 672), (672, 2016),
                (55, 176), (88, 55), (47, 1128), (176, 198), (94, 329), (329, 94), (98, 1029)}
               | {(h, w) for h, w in anyres.DEFAULT_PINPOINTS}
               | {(h // 2, w // 2) for h, w in anyres.DEFAULT_PINPOINTS}
               | {(2 * h, 2 * w) for h, w in anyres.DEFAULT_PINPOINTS}
               | {tuple(int(x) for x in np.exp(_rng.uniform(0, np.log(20000), 2))) for _ in range(400)})

# (pinpoints, tile, patches per tile side): LLaVA-NeXT's default grid with CLIP-336/14; the same grid in
# the other order (ties go the other way); LLaVA-OneVision-style 1x1..3x3 at SigLIP-384/14 (27 patches, a
# 384 tile that 14 does not divide); a test-sized grid of 28 px tiles and 7 patches.
GRIDS = {
    "default": ([list(p) for p in anyres.DEFAULT_PINPOINTS], 336, 24),
    "reversed": ([list(p) for p in reversed(anyres.DEFAULT_PINPOINTS)], 336, 24),
    "3x3-384": ([[384 * i, 384 * j] for i in (1, 2, 3) for j in (1, 2, 3)], 384, 27),
    "tiny": ([[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]], 28, 7),
}


def _hf_count(size_hw, pins, tile, side):
    """transformers' processor count for a llava-hf checkpoint (a CLS token counted, then dropped by the
    "default" feature select), called on a bare processor: it needs no tokenizer for this."""
    proc = object.__new__(LlavaNextProcessor)
    proc.image_processor = SimpleNamespace(image_grid_pinpoints=pins)
    proc.patch_size, proc.num_additional_image_tokens = tile // side, 1
    return proc._get_number_of_features(*size_hw, tile, tile) - 1


@pytest.mark.parametrize("grid", GRIDS)
def test_geometry_matches_transformers(grid):
    pins, tile, side = GRIDS[grid]
    landed = set()
    for size in SIZES:
        best = anyres.select_best_resolution(size, pins)
        assert best == hf_best(size, pins), size
        landed.add(best)
        rows, cols = anyres.grid_shape(size, pins, tile)
        assert (rows, cols) == hf_model.get_anyres_image_grid_shape(list(size), pins, tile), size
        assert anyres.num_tiles(size, pins, tile) == hf_model.image_size_to_num_patches(list(size), pins, tile)
        shape_only = np.broadcast_to(np.zeros((), np.uint8), (3, *size))  # no pixels: only .shape is read
        resized = anyres.resized_shape(size, best)
        assert resized == get_patch_output_size(shape_only, best, ChannelDimension.FIRST), size
        for before, free in zip(anyres.pad_offsets(resized, best), (best[0] - resized[0], best[1] - resized[1])):
            assert 0 <= before <= free - before <= before + 1, size  # centred, the odd pixel after
        features = torch.empty(1, rows * side, cols * side)
        assert anyres.unpadded_shape(size, rows * side, cols * side) == hf_model.unpad_image(features, size).shape[1:]
        assert anyres.num_image_tokens(size, pins, tile, side) == _hf_count(size, pins, tile, side), size
    assert landed == {tuple(p) for p in pins}, f"some pinpoint of {grid} is never chosen by SIZES"


def test_ties_go_to_the_first_pinpoint():
    # a 200 x 200 image fits every default pinpoint whole (40,000 pixels kept); 336x672 and 672x336 waste the
    # same canvas, the least of all: list order decides, as in transformers
    pins = [list(p) for p in anyres.DEFAULT_PINPOINTS]
    assert anyres.select_best_resolution((200, 200), pins) == (336, 672) == hf_best((200, 200), pins)
    assert anyres.select_best_resolution((200, 200), pins[::-1]) == (672, 336) == hf_best((200, 200), pins[::-1])


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1), (100, 300), (300, 100), (50, 60), (333, 517)])
def test_token_count_is_what_pack_image_features_returns(size):
    """The count against the model itself: transformers' pack_image_features on features of the tiny grid's
    shape, with and without the newline (the base image's tokens first, then the unpadded rows)."""
    pins, tile, side = GRIDS["tiny"]
    tower = SimpleNamespace(image_size=tile, patch_size=tile // side)
    config = SimpleNamespace(image_grid_pinpoints=pins, vision_config=tower)
    features = torch.randn(anyres.num_tiles(size, pins, tile), side * side, 3)
    for newline in (torch.randn(3), None):
        (packed,), lens = hf_model.LlavaNextModel.pack_image_features(
            SimpleNamespace(config=config), [features], torch.tensor([size]), "default", newline)
        assert packed.shape[0] == int(lens[0]) == anyres.num_image_tokens(size, pins, tile, side,
                                                                          newline=newline is not None)


def test_strips_keep_no_padded_rows():
    # 1 x 5000: every pinpoint keeps int(1 * scale) = 0 rows, so 0 pixels: the least canvas wins (1 x 2
    # tiles); the image covers int(round(48 / 5000, 7)) = 0 feature rows, so only the base image's 576
    # tokens remain
    assert anyres.grid_shape((1, 5000), anyres.DEFAULT_PINPOINTS, 336) == (1, 2)
    assert anyres.unpadded_shape((1, 5000), 24, 48) == (0, 48)
    assert anyres.num_image_tokens((1, 5000), anyres.DEFAULT_PINPOINTS, 336, 24) == 576


@pytest.mark.parametrize("pins, match", [([], "empty"), ([[336, 500]], "multiples"), ([[0, 336]], "multiples"),
                                         ([[336]], "pairs"), ("336x672", "pairs")])
def test_bad_pinpoints(pins, match):
    with pytest.raises(ValueError, match=match):
        anyres.grid_shape((100, 100), pins, 336)


def test_bad_size():
    with pytest.raises(ValueError, match="positive"):
        anyres.num_image_tokens((0, 10), anyres.DEFAULT_PINPOINTS, 336, 24)
