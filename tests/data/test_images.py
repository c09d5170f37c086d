"""Image preprocessing against transformers' CLIP image processor (the PIL backend, which is what
CLIPImageProcessor resolves to without torchvision and what LLaVA used), on Pillow and DALI."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fastllava.data import images

try:
    from transformers import CLIPImageProcessorPil as _Processor
except ImportError:  # older transformers: the classic processor is the PIL one
    from transformers import CLIPImageProcessor as _Processor

SIZE = 336
# Pillow vs Pillow: same resize code, float rounding only.
PIL_ATOL = 1e-5
# DALI against Pillow on _photo's JPEGs (one uint8 level = 1 / (255 * 0.27) = 0.0146 normalized), measured
# 2026-12-06 on the 2-core CPU, DALI 2.4.0 CPU pipeline, Pillow 13.0: mean <= 0.0002, max 0.045 (3 levels), all
# at the resized image's borders (test_dali_resize_rounds_between_passes_as_pillow). A single fn.resize, which
# keeps its intermediate in float, gave mean 0.0031 and max 0.057 (4 levels) on the same images: both bounds fail it.
DALI_MEAN_ATOL, DALI_MAX_ATOL = 0.001, 3.5 / (255 * min(images.CLIP_STD))

needs_dali = pytest.mark.skipif(not images.HAS_DALI, reason="nvidia.dali not importable (pip install nvidia-dali-cuda120)")


@pytest.fixture(scope="module")
def processor():
    return _Processor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


def _reference(processor, rgb: Image.Image, mode: str) -> torch.Tensor:
    """LLaVA: expand2square with int(255 * mean) (stage 2) then the CLIP processor."""
    if mode == "pad":
        w, h = rgb.size
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), tuple(int(x * 255) for x in processor.image_mean))
        canvas.paste(rgb, ((side - w) // 2, (side - h) // 2))
        rgb = canvas
    return torch.as_tensor(np.asarray(processor(rgb, return_tensors="np")["pixel_values"][0]))


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth structure plus noise, (h, w, 3) uint8: resampling differences show, unlike flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    chans = [127 + 100 * np.sin(x / 17.0 + c) * np.cos(y / 23.0 - c) for c in range(3)]
    return np.clip(np.stack(chans, -1) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


SIZES = [(640, 480), (333, 517), (200, 180), (97, 1025), (336, 336), (1, 1), (2, 3)]


@pytest.mark.parametrize("mode", ["pad", "square"])
@pytest.mark.parametrize("wh", SIZES)
def test_pil_matches_clip_processor(tmp_path, processor, wh, mode):
    path = tmp_path / "img.png"
    Image.fromarray(_photo(*wh)).save(path)
    out = images.load_image(path, mode, SIZE, backend="pil")
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    ref = _reference(processor, Image.open(path).convert("RGB"), mode)
    torch.testing.assert_close(out, ref, atol=PIL_ATOL, rtol=0)


def test_geometry_truncates_like_clip():
    # 336 * 517 / 333 = 521.6...: CLIP truncates to 521 (rounding would give 522); crop offset 92.
    assert images.resize_geometry(333, 517, "square", 336)[1:] == ((336, 521), (0, 92))
    # pad: 333 x 517 centred on 517 x 517 at x = (517 - 333) // 2 = 92
    assert images.resize_geometry(333, 517, "pad", 336)[0] == (-92, 0, 517, 517)


def _odd_modes(tmp_path):
    """(path, expected RGB image) for every mode the loader must handle."""
    base = Image.fromarray(_photo(150, 110, seed=1))
    cases = {}
    base.convert("L").save(p := tmp_path / "gray.png")
    cases["L"] = (p, base.convert("L").convert("RGB"))
    base.convert("L").save(p := tmp_path / "gray.jpg", quality=95)
    cases["L-jpeg"] = (p, Image.open(p).convert("RGB"))
    base.convert("CMYK").save(p := tmp_path / "cmyk.jpg", quality=95)
    cases["CMYK"] = (p, Image.open(p).convert("RGB"))
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    pal.save(p := tmp_path / "pal.png", transparency=0)
    cases["P+transparency"] = (p, Image.open(p).convert("RGB"))  # LLaVA: .convert("RGB") drops alpha
    rgba = base.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.arange(150, dtype=np.uint8), (110, 1))))
    rgba.save(p := tmp_path / "rgba.png")
    cases["RGBA"] = (p, base)  # alpha dropped, colour kept
    base.convert("LA").save(p := tmp_path / "la.png")
    cases["LA"] = (p, base.convert("L").convert("RGB"))
    wide = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)  # full 16-bit range
    Image.fromarray(wide).save(p := tmp_path / "gray16.png")
    cases["16-bit"] = (p, base.convert("L").convert("RGB"))
    base.convert("1").save(p := tmp_path / "bilevel.png")
    cases["1"] = (p, base.convert("1").convert("RGB"))
    return cases


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_odd_modes(tmp_path, processor, backend):
    for name, (path, expected) in _odd_modes(tmp_path).items():
        out = images.load_image(path, "pad", SIZE, backend=backend)
        ref = _reference(processor, expected, "pad")
        # these files are routed to Pillow except plain L; L goes through DALI
        err = (out - ref).abs()
        assert err.mean() < DALI_MEAN_ATOL and err.max() < DALI_MAX_ATOL, (name, float(err.max()))
        if backend == "pil":
            torch.testing.assert_close(out, ref, atol=PIL_ATOL, rtol=0, msg=name)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    wide = np.full((20, 30), 128 * 257, dtype=np.uint16)
    Image.fromarray(wide).save(p := tmp_path / "g16.png")
    out = images.load_image(p, "square", 8, backend="pil")
    expected = (128 / 255 - torch.tensor(images.CLIP_MEAN)) / torch.tensor(images.CLIP_STD)
    torch.testing.assert_close(out[:, 0, 0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_exif_orientation_applied(tmp_path, processor, backend):
    base = Image.fromarray(_photo(200, 120, seed=2))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate 90 degrees clockwise
    base.save(p := tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
    assert upright.size == (120, 200)
    out = images.load_image(p, "pad", SIZE, backend=backend)
    torch.testing.assert_close(out, _reference(processor, upright, "pad"), atol=PIL_ATOL, rtol=0)
    ignored = _reference(processor, Image.open(p).convert("RGB"), "pad")  # what LLaVA would feed
    assert (out - ignored).abs().mean() > 0.1


@needs_dali
@pytest.mark.parametrize("mode", ["pad", "square"])
def test_dali_matches_clip_processor(tmp_path, processor, mode):
    paths, refs = [], []
    for k, wh in enumerate([(640, 480), (333, 517), (200, 180), (97, 1025), (1, 1)]):
        Image.fromarray(_photo(*wh, seed=k)).save(p := tmp_path / f"{k}.jpg", quality=95)
        paths.append(p)
        refs.append(_reference(processor, Image.open(p).convert("RGB"), mode))
    out = images.load_images(paths, mode, SIZE, backend="dali")
    assert out.shape == (len(paths), 3, SIZE, SIZE)
    for k, ref in enumerate(refs):
        err = (out[k] - ref).abs()
        assert err.mean() < DALI_MEAN_ATOL and err.max() < DALI_MAX_ATOL, (paths[k], float(err.mean()), float(err.max()))
    # the DALI path was taken: its resize is not bit-identical to Pillow's on these images
    assert (out[0] - images.load_image(paths[0], mode, SIZE, backend="pil")).abs().max() > 0


def resize_margin(n_in: int, n_out: int) -> int:
    """Output pixels of an n_in -> n_out resize within reach of an edge: the cubic's support, 2 input pixels
    (2 output pixels when shrinking), plus one. There Pillow renormalizes the kernel that the edge cuts and DALI
    repeats the edge pixel, so on noise they differ by up to 22 levels; inside, only rounding differs."""
    return math.ceil(2 * max(1.0, n_out / n_in)) + 1


def _dali_resized(arrays, out_hws, interp: str):
    """images.dali_resize of each (h, w, 3) uint8 array to its (height, width), in pillow_passes' order."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(arrays), num_threads=1, device_id=None, prefetch_queue_depth=1, exec_dynamic=True)
    def pipe():
        x = fn.external_source(name="x", batch=True, layout="HWC")
        first, second = (fn.external_source(name=n, batch=True) for n in ("first", "second"))
        return images.dali_resize(x, first, second, getattr(types, interp))

    built = pipe()
    built.build()
    passes = [images.pillow_passes(a.shape[:2], hw) for a, hw in zip(arrays, out_hws)]
    built.feed_input("x", arrays, layout="HWC")
    built.feed_input("first", [first for first, _ in passes])
    built.feed_input("second", [second for _, second in passes])
    (out,) = built.run()
    return [np.asarray(out[i]) for i in range(len(arrays))]


# (in, out) (height, width): both grow; the height shrinks while the width grows (Pillow: height first); the
# height grows while the width shrinks; one axis only, each way; both shrink by one factor (Pillow: width first)
RESIZES = [((50, 130), (75, 195)), ((130, 50), (60, 140)), ((60, 140), (90, 47)), ((60, 80), (60, 33)),
           ((60, 80), (151, 80)), ((120, 160), (60, 80))]


@needs_dali
@pytest.mark.parametrize("resample, interp", [(Image.Resampling.BICUBIC, "INTERP_CUBIC"),
                                              (Image.Resampling.BILINEAR, "INTERP_LINEAR")])
def test_dali_resize_rounds_between_passes_as_pillow(resample, interp):
    """On uniform noise, where the cubic overshoots [0, 255] most, away from the borders (resize_margin): Pillow
    resamples one axis, rounds and clips to uint8, then the other; dali_resize does the same and is within 2
    levels: DALI's tabulated weights are Pillow's to 6e-4 (measured on impulses), so the intermediate can round
    one level apart, which the second pass's weights (their absolute values sum to <= 1.3) carry to at most 2.
    Measured (2026-12-06, DALI 2.4.0 CPU, Pillow 13.0): at most 2, cubic and bilinear; a single fn.resize (float
    intermediate) is up to 22 levels off with the cubic, two passes in the wrong order up to 23 (the bilinear
    never overshoots: there both differ by rounding only)."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (*in_hw, 3), dtype=np.uint8) for in_hw, _ in RESIZES]
    outs = _dali_resized(arrays, [out_hw for _, out_hw in RESIZES], interp)
    for array, (in_hw, (h, w)), out in zip(arrays, RESIZES, outs):
        ref = np.asarray(Image.fromarray(array).resize((w, h), resample)).astype(int)
        assert out.shape == ref.shape, (in_hw, out.shape)
        mh, mw = resize_margin(in_hw[0], h), resize_margin(in_hw[1], w)
        inside = np.abs(out.astype(int) - ref)[mh : h - mh, mw : w - mw]
        assert inside.max() <= 2, (in_hw, (h, w), inside.max())


def test_large_image_and_pixel_limit(tmp_path, monkeypatch):
    y, x = np.mgrid[0:6000:8, 0:8000:8]
    small = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    big = Image.fromarray(small).resize((8000, 6000), Image.Resampling.NEAREST)
    big.save(p := tmp_path / "big.jpg", quality=80)
    out = images.load_image(p, "pad", SIZE, backend="pil")
    assert out.shape == (3, SIZE, SIZE) and torch.isfinite(out).all()
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 8000 * 6000 - 1)
    with pytest.raises(images.ImageError, match="big.jpg.*MAX_IMAGE_PIXELS"):
        images.load_image(p, backend="pil")


def _bad_files(tmp_path):
    Image.fromarray(_photo(300, 200)).save(good := tmp_path / "good.jpg", quality=95)
    data = good.read_bytes()
    (truncated := tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (corrupt := tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    (garbage := tmp_path / "garbage.png").write_bytes(b"not an image at all")
    Image.fromarray(_photo(300, 200)).save(png := tmp_path / "good.png")
    (truncated_png := tmp_path / "truncated.png").write_bytes(png.read_bytes()[:5000])
    return [truncated, corrupt, garbage, truncated_png, tmp_path / "missing.jpg"]


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_bad_files_raise_image_error_naming_path(tmp_path, backend):
    for bad in _bad_files(tmp_path):
        with pytest.raises(images.ImageError) as info:
            images.load_image(bad, backend=backend)
        assert str(bad) in str(info.value) and info.value.path == str(bad)
        assert isinstance(info.value, ValueError)
    # in a batch, the bad file is named even though its neighbours are fine
    paths = [tmp_path / "good.jpg", tmp_path / "truncated.jpg", tmp_path / "good.png"]
    with pytest.raises(images.ImageError, match="truncated.jpg"):
        images.load_images(paths, backend=backend)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        images.load_image("x.jpg", mode="resize")
    with pytest.raises(ValueError, match="backend"):
        images.load_image("x.jpg", backend="cv2")
