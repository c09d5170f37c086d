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
from test_images import needs_dali, resize_margin
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


@pytest.mark.parametrize("pins, match", [([], "empty"), ([[336, 500]], "multiples"), ([[0, 336]], "must be positive"),
                                         ([[336]], "pairs"), ("336x672", "pairs")])
def test_bad_pinpoints(pins, match):
    with pytest.raises(ValueError, match=match):
        anyres.grid_shape((100, 100), pins, 336)


def test_bad_size():
    with pytest.raises(ValueError, match="positive"):
        anyres.num_image_tokens((0, 10), anyres.DEFAULT_PINPOINTS, 336, 24)


# ----------------------------------------------------------------------------- tiles against the processor

# Pillow vs Pillow (the processor's PIL backend): the same resize code, float rounding of the normalization
# only, as tests/data/test_images.py's PIL_ATOL for CLIPImageProcessor.
PIL_ATOL = 1e-5
# (width, height): landscape and portrait photos, 1 x N and N x 1 strips, each default pinpoint's aspect, a
# small square (a tie), sides that do not divide, a large photo
TILE_SIZES = [(640, 480), (480, 640), (700, 1), (1, 700), (1000, 300), (300, 1000), (900, 900), (200, 200),
              (97, 1025), (1025, 97), (333, 517), (3000, 2000)]


def _processors():
    """(our AnyRes, transformers' LlavaNextImageProcessorPil) pairs: LLaVA-NeXT's CLIP-336; a SigLIP-384-like
    processor (no crop, mean/std 0.5) on a 3x3 grid; a CLIP processor whose resize is not a no-op on tiles
    (shortest edge 256 then a 224 crop)."""
    from transformers import LlavaNextImageProcessorPil

    from fastllava.data.anyres_images import AnyRes
    from fastllava.data.images import Preprocess

    clip = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    siglip = {"size": {"height": 384, "width": 384}, "crop_size": {"height": 384, "width": 384},
              "do_center_crop": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
              "image_grid_pinpoints": GRIDS["3x3-384"][0]}
    resize_crop = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
                   "image_grid_pinpoints": [[224, 448], [448, 224], [448, 448]]}
    return {
        "clip-336": (AnyRes(Preprocess(336, 336)), LlavaNextImageProcessorPil(**clip)),
        "siglip-384": (AnyRes(Preprocess(384, None, (0.5,) * 3, (0.5,) * 3), GRIDS["3x3-384"][0]),
                       LlavaNextImageProcessorPil(**siglip)),
        "resize-crop-224": (AnyRes(Preprocess(224, 256), resize_crop["image_grid_pinpoints"]),
                            LlavaNextImageProcessorPil(**resize_crop)),
    }


@pytest.fixture(scope="module")
def processors():
    return _processors()


def _tile_files(folder, ext: str):
    """Files of TILE_SIZES; the large one a smooth upscale of a small photo (quick to make and to save)."""
    from PIL import Image
    from test_images import _photo as photo

    paths = []
    for k, (w, h) in enumerate(TILE_SIZES):
        img = Image.fromarray(photo(w, h, seed=k)) if w * h < 10**6 else \
            Image.fromarray(photo(w // 4, h // 4, seed=k)).resize((w, h), Image.Resampling.BICUBIC)
        img.save(path := folder / f"{w}x{h}.{ext}", **({"quality": 95} if ext == "jpg" else {"compress_level": 1}))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tile_files(tmp_path_factory):
    return _tile_files(tmp_path_factory.mktemp("anyres"), "png")


@pytest.mark.parametrize("which", ["clip-336", "siglip-384", "resize-crop-224"])
def test_tiles_match_llava_next_processor(processors, tile_files, which):
    from PIL import Image

    from fastllava.data.anyres_images import load_anyres

    ours, theirs = processors[which]
    for path, (w, h) in zip(tile_files, TILE_SIZES):
        out = load_anyres(path, ours)
        ref = theirs(Image.open(path).convert("RGB"), return_tensors="pt")
        assert ref["image_sizes"].tolist() == [[h, w]]
        assert out.dtype == torch.float32 and out.shape == ref["pixel_values"][0].shape, path.name
        assert out.shape[0] == ours.num_tiles((h, w))
        torch.testing.assert_close(out, ref["pixel_values"][0], atol=PIL_ATOL, rtol=0, msg=path.name)


# ----------------------------------------------------------------------------- sizes from headers


def _png_with_chunk_after_pixels(src, dst, kind: bytes, data: bytes):
    """src's PNG bytes with one chunk inserted just before IEND, i.e. after the pixel data."""
    import struct
    import zlib

    raw = src.read_bytes()
    end = raw.rindex(b"IEND") - 4  # the length field before it
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    dst.write_bytes(raw[:end] + chunk + raw[end:])


def _header_files(folder):
    """JPEG, PNG, WebP and TIFF files of several sizes and EXIF orientations (5-8 swap height and width), and
    PNGs whose orientation comes in an eXIf or XMP chunk after the pixels."""
    from PIL import Image
    from test_images import _photo as photo

    paths = []
    for k, (w, h) in enumerate([(640, 480), (427, 640), (1, 300), (300, 1), (1000, 333), (97, 1025)]):
        img = Image.fromarray(photo(w, h, seed=k))
        img.save(p := folder / f"{w}x{h}.jpg", quality=90)
        paths.append(p)
        img.save(p := folder / f"{w}x{h}.png", compress_level=1)
        paths.append(p)
        for orientation in (3, 6, 8, 5):
            exif = Image.Exif()
            exif[0x0112] = orientation
            # WebP and TIFF once a size: Pillow's TIFF plugin turns at open, unlike the others
            for ext in ("jpg", "png") + (("webp", "tiff") if orientation == 6 else ()):
                img.save(p := folder / f"{w}x{h}-o{orientation}.{ext}", exif=exif)
                paths.append(p)
    exif = Image.Exif()
    exif[0x0112] = 6
    _png_with_chunk_after_pixels(folder / "640x480.png", p := folder / "exif-after-pixels.png", b"eXIf",
                                 exif.tobytes().removeprefix(b"Exif\x00\x00"))
    paths.append(p)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    _png_with_chunk_after_pixels(folder / "427x640.png", p := folder / "xmp-after-pixels.png", b"iTXt",
                                 b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp)
    paths.append(p)
    return paths


def test_header_size_is_the_decoded_size(tmp_path, monkeypatch):
    from PIL import ImageFile

    from fastllava.data.anyres_images import image_size, image_sizes
    from fastllava.data.images import pil_decode

    paths = _header_files(tmp_path)
    decoded = [pil_decode(p, "anyres").size[::-1] for p in paths]  # (height, width), orientation applied
    by_name = dict(zip((p.name for p in paths), decoded))  # the files' rotations are real: a quarter turn swaps
    assert by_name["640x480.png"] == by_name["640x480-o3.png"] == (480, 640)
    assert by_name["640x480-o6.jpg"] == by_name["exif-after-pixels.png"] == (640, 480)
    assert by_name["427x640.png"] == by_name["xmp-after-pixels.png"][::-1] == (640, 427)
    after = [p for p in paths if "after-pixels" in p.name]
    assert [image_size(p) for p in after] == [d for p, d in zip(paths, decoded) if p in after]
    # the other files: from their headers alone, no pixel decoded
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail(f"{self.filename} decoded"))
    rest = [p for p in paths if p not in after]
    assert image_sizes(rest) == [d for p, d in zip(paths, decoded) if p not in after]


def test_token_counts_from_headers_equal_counts_from_pixels(tmp_path):
    """The count the planner gets from a header against transformers' count from the decoded pixels'
    image_sizes, and the tiles against the processor's (on the test-sized grid: the counts are what is tested)."""
    from transformers import LlavaNextImageProcessorPil

    from fastllava.data.anyres_images import AnyRes, image_size, load_anyres
    from fastllava.data.images import Preprocess, pil_decode

    pins, tile, side = GRIDS["tiny"]
    ours = AnyRes(Preprocess(tile, tile), pins)
    theirs = LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                        image_grid_pinpoints=pins)
    for path in _header_files(tmp_path):
        ref = theirs(pil_decode(path, "anyres"), return_tensors="pt")
        size = tuple(ref["image_sizes"][0].tolist())
        count = anyres.num_image_tokens(image_size(path), ours.pinpoints, tile, side)
        assert count == _hf_count(size, pins, tile, side), path.name
        assert load_anyres(path, ours).shape[0] == ref["pixel_values"].shape[1], path.name


def test_header_errors_name_the_file(tmp_path):
    from fastllava.data.anyres_images import image_size
    from fastllava.data.images import ImageError

    (bad := tmp_path / "garbage.jpg").write_bytes(b"not an image")
    for path in (bad, tmp_path / "missing.png"):
        with pytest.raises(ImageError, match=path.name):
            image_size(path)


def test_from_hf_reads_a_llava_next_preprocessor_config(processors):
    from fastllava.data.anyres_images import AnyRes

    for which in ("clip-336", "siglip-384"):
        ours, theirs = processors[which]
        raw = {**theirs.to_dict(), "image_processor_type": "LlavaNextImageProcessor"}
        assert AnyRes.from_hf(raw, ours.processor.size, "p.json") == ours
    with pytest.raises(ValueError, match="p.json.*LlavaNextImageProcessor"):
        AnyRes.from_hf({"image_processor_type": "CLIPImageProcessor"}, 336, "p.json")
    with pytest.raises(ValueError, match="p.json.*multiples"):
        AnyRes.from_hf({"image_processor_type": "LlavaNextImageProcessor", "image_grid_pinpoints": [[336, 500]]},
                       336, "p.json")


def test_pixel_limit_counts_the_decoded_image_only(tmp_path, monkeypatch):
    """A 4 x 3000 strip: mode "pad" would hold a 3000 x 3000 canvas, AnyRes at most a pinpoint's."""
    from PIL import Image

    from fastllava.data import images
    from fastllava.data.anyres_images import AnyRes, image_size, load_anyres

    Image.new("RGB", (3000, 4), (10, 200, 30)).save(path := tmp_path / "strip.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 3000 * 4)
    with pytest.raises(images.ImageError, match="strip.png.*padded"):
        images.load_image(path, "pad", backend="pil")
    assert load_anyres(path, AnyRes()).shape == (4, 3, 336, 336)  # the base image and 1 x 3 tiles
    assert image_size(path) == (4, 3000)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 3000 * 4 - 1)
    for refused in (lambda: load_anyres(path, AnyRes()), lambda: image_size(path)):
        with pytest.raises(images.ImageError, match="strip.png.*MAX_IMAGE_PIXELS"):
            refused()


# ----------------------------------------------------------------------------- DALI

# DALI against the processor (Pillow), in uint8 levels after the normalization (as test_siglip_preprocess.py),
# measured here (2026-12-06, 2-core CPU, DALI 2.4.0 CPU pipeline, Pillow 13.0) on TILE_SIZES as JPEGs: at most
# 4 levels, at the resized images' borders (test_images.resize_margin), 0.06 of a level on average at most
# (CLIP-336 and SigLIP-384). A single fn.resize per image (a float intermediate) averaged 0.22: the mean bound
# fails it.
DALI_MEAN_LEVELS, DALI_MAX_LEVELS = 0.1, 4.5


@needs_dali
@pytest.mark.parametrize("which", ["clip-336", "siglip-384"])
def test_dali_tiles_match_llava_next_processor(tmp_path, processors, which):
    from PIL import Image

    from fastllava.data.anyres_images import load_anyres, load_anyres_images

    ours, theirs = processors[which]
    level = 1 / (255 * min(ours.processor.std))
    paths = _tile_files(tmp_path, "jpg")
    out = load_anyres_images(paths, ours, backend="dali")
    for path, tiles in zip(paths, out):
        ref = theirs(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        assert tiles.dtype == torch.float32 and tiles.shape == ref.shape, path.name
        err = (tiles - ref).abs() / level
        assert err.mean() < DALI_MEAN_LEVELS and err.max() < DALI_MAX_LEVELS, (path.name, err.mean(), err.max())
    # the DALI path was taken: its resize is not bit-identical to Pillow's
    assert (out[0] - load_anyres(paths[0], ours)).abs().max() > 0


def _inside(size_hw, spec):
    """(1 + tiles, S, S) bool: the pixels of the base image and of the tiles farther than
    test_images.resize_margin from the borders of their resized image (the tiles: of the image inside the canvas)."""
    side = spec.processor.size
    canvas_hw = anyres.select_best_resolution(size_hw, spec.pinpoints)
    resized = anyres.resized_shape(size_hw, canvas_hw)
    top, left = anyres.pad_offsets(resized, canvas_hw)
    canvas = torch.zeros(canvas_hw, dtype=torch.bool)
    mh, mw = (resize_margin(n, m) for n, m in zip(size_hw, resized))
    canvas[top + mh : top + resized[0] - mh, left + mw : left + resized[1] - mw] = True
    tiles = canvas.view(canvas_hw[0] // side, side, -1, side).transpose(1, 2).reshape(-1, side, side)
    base = torch.zeros(side, side, dtype=torch.bool)
    mh, mw = (resize_margin(n, side) for n in size_hw)
    base[mh : side - mh, mw : side - mw] = True
    return torch.cat([base[None], tiles])


# (height, width) of noise images: tests/train/test_anyres_train.py's, where a single fn.resize per image left
# DALI's tiles 9 levels (0.135) from Pillow's, and a photo's sizes at 336 px
NOISE_SIZES = {28: [(15, 65), (65, 15), (50, 45), (25, 50), (48, 20), (1, 150), (900, 1200), (50, 130)],
               336: [(480, 640), (517, 333), (300, 1000), (200, 200), (50, 130)]}


@needs_dali
@pytest.mark.parametrize("side", NOISE_SIZES)
def test_dali_tiles_of_noise_match_pillow_inside(tmp_path, side):
    """Uniform noise, the worst case for the cubic's overshoot: away from the resized images' borders, DALI's
    tiles and base images are Pillow's to 2 levels (test_images.test_dali_resize_rounds_between_passes_as_pillow
    says why). A single fn.resize per image was 22 levels off there. At the borders they differ by up to 22
    levels on noise (Pillow renormalizes the kernel the edge cuts, DALI repeats the edge pixel), 4 on photos.
    Not covered: an image shrunk along both axes goes height first in Pillow 13.0 in about a quarter of the
    cases, by a rule not found (images.pillow_passes); a 640 x 480 (height x width) noise image's base image is
    then 11 levels off inside."""
    from PIL import Image

    from fastllava.data.anyres_images import AnyRes, load_anyres, load_anyres_images
    from fastllava.data.images import Preprocess

    pins = GRIDS["tiny"][0] if side == 28 else [list(p) for p in anyres.DEFAULT_PINPOINTS]
    spec = AnyRes(Preprocess(side, side), pins)
    rng = np.random.default_rng(0)
    paths = []
    for h, w in NOISE_SIZES[side]:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path := tmp_path / f"{h}x{w}.png")
        paths.append(path)
    level = 1 / (255 * min(spec.processor.std))
    for path, size, tiles in zip(paths, NOISE_SIZES[side], load_anyres_images(paths, spec, backend="dali")):
        err = ((tiles - load_anyres(path, spec)).abs() / level).amax(1)  # (1 + tiles, S, S), worst channel
        inside = err[_inside(size, spec)]  # empty for a 1 x 150 strip: all border
        assert (inside < 2.5).all(), (path.name, float(inside.max()))


@needs_dali
def test_dali_routes_what_it_cannot_match_to_pillow(tmp_path, processors):
    """EXIF-rotated and RGBA files go through Pillow inside a DALI batch; a processor that resizes its tiles
    goes through Pillow on "auto" and is refused on "dali"."""
    from PIL import Image

    from fastllava.data.anyres_images import load_anyres, load_anyres_images
    from test_images import _photo as photo

    ours, _ = processors["clip-336"]
    img = Image.fromarray(photo(500, 300, seed=3))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(rotated := tmp_path / "rotated.jpg", exif=exif, quality=95)
    img.putalpha(128)
    img.save(rgba := tmp_path / "rgba.png")
    Image.fromarray(photo(640, 480)).save(plain := tmp_path / "plain.jpg", quality=95)
    out = load_anyres_images([rotated, plain, rgba], ours, backend="dali")
    for path, tiles in zip([rotated, rgba], [out[0], out[2]]):
        assert torch.equal(tiles, load_anyres(path, ours)), path.name
    assert out[0].shape[0] == ours.num_tiles((500, 300))  # upright: 500 high
    resizing, _ = processors["resize-crop-224"]
    with pytest.raises(ValueError, match="dali.*shortest_edge 256"):
        load_anyres_images([plain], resizing, backend="dali")
    assert torch.equal(load_anyres_images([plain], resizing)[0], load_anyres(plain, resizing))


def test_load_anyres_images_bad_backend():
    from fastllava.data.anyres_images import AnyRes, load_anyres_images

    with pytest.raises(ValueError, match="backend"):
        load_anyres_images(["x.jpg"], AnyRes(), backend="cv2")
