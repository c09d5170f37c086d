"""SigLIP's preprocessing against transformers' SiglipImageProcessor (its PIL backend, which is what it resolves
to without torchvision, as CLIP's does in test_images.py), on Pillow and DALI; what a preprocessor_config.json
says, read and refused; the processor a run picks (train/build.py).

Measured here (2026-12-06, 2-core CPU, Pillow 13.0, DALI 2.4.0 CPU): Pillow vs the processor, max 1.2e-7 (float
rounding: both resize the same uint8 image with Pillow's filter); DALI's antialiased cubic / linear resize vs
Pillow's, at most 4 uint8 levels (bicubic) or 5 (bilinear), and 0.07 of a level on average, over these images
(0.22 in DALI's single resize pass before images.dali_resize).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_images import SIZES, needs_dali
from test_images import _photo as photo
from test_images import _reference as reference

from fastllava import Llava
from fastllava.data import images
from fastllava.data.images import Preprocess
from fastllava.testing import tiny_config
from fastllava.train.build import build_dataset, build_image_processor

try:
    from transformers import CLIPImageProcessorPil as _CLIP
    from transformers import SiglipImageProcessorPil as _Siglip
except ImportError:  # older transformers: the classic processors are the PIL ones
    from transformers import CLIPImageProcessor as _CLIP
    from transformers import SiglipImageProcessor as _Siglip

SIZE = 384  # siglip-so400m-patch14-384
PIL_ATOL = 1e-5
LEVEL = 1 / (255 * 0.5)  # one uint8 level after SigLIP's normalization
DALI_MEAN_ATOL, DALI_MAX_ATOL = 0.1 * LEVEL, 5.5 * LEVEL
BICUBIC, BILINEAR = int(Image.Resampling.BICUBIC), int(Image.Resampling.BILINEAR)


@pytest.fixture(scope="module", params=[BICUBIC, BILINEAR], ids=["bicubic", "bilinear"])
def siglip(request, tmp_path_factory):
    """(transformers' processor, ours read from the directory it saved). Bicubic is SigLIP's default; bilinear
    is what a preprocessor_config.json may name instead."""
    processor = _Siglip(size={"height": SIZE, "width": SIZE}, resample=request.param)
    directory = tmp_path_factory.mktemp("siglip")
    processor.save_pretrained(directory)
    # the CLIP default is what a directory without the file would get: reading the file must override it
    ours = Preprocess.from_dir(directory, "CLIPImageProcessor", SIZE)
    assert ours == Preprocess(SIZE, None, (0.5,) * 3, (0.5,) * 3, request.param)
    return processor, ours


@pytest.mark.parametrize("mode", ["pad", "square"])
@pytest.mark.parametrize("wh", SIZES + [(384, 384), (1500, 400)])
def test_pil_matches_siglip_processor(tmp_path, siglip, wh, mode):
    processor, ours = siglip
    Image.fromarray(photo(*wh)).save(path := tmp_path / "img.png")
    out = images.load_image(path, mode, SIZE, backend="pil", processor=ours)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(processor, Image.open(path).convert("RGB"), mode), atol=PIL_ATOL, rtol=0)


def test_pad_colour_is_the_towers_mean(tmp_path):
    """A 1 x 3 strip padded to 3 x 3: the top and bottom rows are the pad, int(255 * mean) per channel, which
    normalizes to (127 / 255 - 0.5) / 0.5 for SigLIP and to CLIP's own value for CLIP."""
    Image.fromarray(np.full((1, 3, 3), 200, np.uint8)).save(path := tmp_path / "strip.png")
    for processor, pad in ((Preprocess.default("SiglipImageProcessor", 3), [127] * 3),
                           (Preprocess.default("CLIPImageProcessor", 3), [122, 116, 104])):
        out = images.load_image(path, "pad", 3, backend="pil", processor=processor)
        expected = (torch.tensor(pad) / 255 - torch.tensor(processor.mean)) / torch.tensor(processor.std)
        torch.testing.assert_close(out[:, 0, 1], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(out[:, 2, 1], expected, atol=1e-6, rtol=0)


@needs_dali
@pytest.mark.parametrize("mode", ["pad", "square"])
def test_dali_matches_siglip_processor(tmp_path, siglip, mode):
    processor, ours = siglip
    paths, refs = [], []
    for k, wh in enumerate([(640, 480), (333, 517), (200, 180), (97, 1025), (1500, 400), (1, 1)]):
        Image.fromarray(photo(*wh, seed=k)).save(p := tmp_path / f"{k}.jpg", quality=95)
        paths.append(p)
        refs.append(reference(processor, Image.open(p).convert("RGB"), mode))
    out = images.load_images(paths, mode, SIZE, backend="dali", processor=ours)
    for k, ref in enumerate(refs):
        err = (out[k] - ref).abs()
        assert err.mean() < DALI_MEAN_ATOL and err.max() < DALI_MAX_ATOL, (paths[k], float(err.mean()),
                                                                           float(err.max()))
    # the DALI path was taken: its resize is not bit-identical to Pillow's on these images
    assert (out[0] - images.load_image(paths[0], mode, SIZE, backend="pil", processor=ours)).abs().max() > 0


def test_a_filter_dali_cannot_match_goes_to_pillow_or_is_refused(tmp_path):
    lanczos = Preprocess(SIZE, None, (0.5,) * 3, (0.5,) * 3, int(Image.Resampling.LANCZOS))
    Image.fromarray(photo(300, 200)).save(path := tmp_path / "a.jpg", quality=95)
    if images.HAS_DALI:
        with pytest.raises(ValueError, match="'dali' has no match for Pillow's lanczos resampling"):
            images.load_image(path, "pad", SIZE, backend="dali", processor=lanczos)
    auto = images.load_image(path, "pad", SIZE, backend="auto", processor=lanczos)
    assert torch.equal(auto, images.load_image(path, "pad", SIZE, backend="pil", processor=lanczos))


# ----------------------------------------------------------------------------- preprocessor_config.json


def test_clip_configs_of_every_vintage_read_as_llava_15s():
    clip = Preprocess(336, 336)  # load_image's default: LLaVA-1.5's CLIP preprocessing
    llava_hf = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
                "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "resample": 3,
                "image_mean": list(images.CLIP_MEAN), "image_std": list(images.CLIP_STD),
                "processor_class": "LlavaProcessor"}
    openai = {"feature_extractor_type": "CLIPFeatureExtractor", "size": 336, "crop_size": 336, "do_center_crop": True,
              "resample": 3, "image_mean": list(images.CLIP_MEAN), "image_std": list(images.CLIP_STD)}
    for raw in (llava_hf, openai, {"image_processor_type": "CLIPImageProcessorFast"}):
        assert Preprocess.from_hf(raw, 336, "x") == clip
    assert Preprocess.default("SiglipImageProcessor", 384) == Preprocess(384, None, (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("kind", ["siglip", "clip-imagenet"])
def test_to_hf_is_read_by_transformers_as_the_same_preprocessing(tmp_path, kind):
    """transformers' processor built from Preprocess.to_hf() gives our pixels, and the dict reads back equal; the
    CLIP case resizes to 256 and crops 224 (ImageNet's geometry), so the crop offset is exercised too."""
    ours = (Preprocess(64, None, (0.5,) * 3, (0.5,) * 3) if kind == "siglip"
            else Preprocess(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    raw = ours.to_hf()
    assert Preprocess.from_hf(json.loads(json.dumps(raw)), ours.size, "x") == ours
    kwargs = {k: v for k, v in raw.items() if k != "image_processor_type"}
    processor = (_Siglip if kind == "siglip" else _CLIP)(**kwargs)
    for wh in [(333, 517), (640, 480)]:
        Image.fromarray(photo(*wh)).save(path := tmp_path / "a.png")
        for mode in ("pad", "square"):
            out = images.load_image(path, mode, ours.size, backend="pil", processor=ours)
            torch.testing.assert_close(out, reference(processor, Image.open(path).convert("RGB"), mode),
                                       atol=PIL_ATOL, rtol=0)


@pytest.mark.parametrize("raw,message", [
    ({"image_processor_type": "Siglip2ImageProcessor", "max_num_patches": 256},
     "'Siglip2ImageProcessor', expected one"),
    ({"image_processor_type": "SiglipImageProcessor", "size": {"height": 224, "width": 224}},
     "gives 224x224 images but the tower takes 384x384"),
    ({"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 512}}, "size .* not supported"),
    ({"image_processor_type": "SiglipImageProcessor", "do_normalize": False}, "do_normalize False is not supported"),
    ({"image_processor_type": "SiglipImageProcessor", "rescale_factor": 1.0}, "rescale_factor 1.0"),
    ({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 300}, "crop_size": 384},
     "shortest_edge 300 is below the crop size 384"),
    ({"image_processor_type": "CLIPImageProcessor", "do_center_crop": False, "size": {"shortest_edge": 384}},
     "without a centre crop"),
    ({"image_processor_type": "SiglipImageProcessor", "resample": 9}, "resample 9 is not a PIL filter"),
])
def test_unsupported_processors_are_refused_naming_the_file(tmp_path, raw, message):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"preprocessor_config.json: .*{message}"):
        Preprocess.from_dir(tmp_path, "SiglipImageProcessor", SIZE)


def test_a_size_that_disagrees_with_the_processor_is_refused():
    with pytest.raises(ValueError, match="size 336 but the processor gives 384x384"):
        images.load_image("x.jpg", "pad", 336, processor=Preprocess.default("SiglipImageProcessor", 384))


# ----------------------------------------------------------------------------- the run's processor


SIGLIP_TOWER = {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}


def _run_config(tmp_path, *overrides):
    from fastllava.config import load_config

    (tmp_path / "llm").mkdir(exist_ok=True)  # the configuration refuses a path that neither exists nor is a Hub id
    return load_config(None, ["model.source=components", f"model.vision_path={tmp_path / 'tower'}",
                              f"model.llm_path={tmp_path / 'llm'}", *overrides])


def test_run_picks_the_towers_file_then_the_family_then_what_data_names(tmp_path):
    (tmp_path / "tower").mkdir()
    siglip_model, clip_model = Llava(tiny_config(vision=SIGLIP_TOWER)), Llava(tiny_config())
    size = siglip_model.config.vision.image_size
    cfg = _run_config(tmp_path)
    # no preprocessor_config.json: the tower family's processor at the tower's image size
    assert build_image_processor(cfg, siglip_model) == Preprocess.default("SiglipImageProcessor", size)
    assert build_image_processor(cfg, clip_model) == Preprocess(size, size)
    # the tower directory's file
    _Siglip(size={"height": size, "width": size}, image_mean=[0.25] * 3).save_pretrained(tmp_path / "tower")
    assert build_image_processor(cfg, siglip_model).mean == (0.25,) * 3
    # data.image_processor: a file or a directory, over the tower's
    _Siglip(size={"height": size, "width": size}, image_std=[0.2] * 3).save_pretrained(tmp_path / "named")
    for named in (tmp_path / "named", tmp_path / "named" / "preprocessor_config.json"):
        cfg = _run_config(tmp_path, f"data.image_processor={named}")
        assert build_image_processor(cfg, siglip_model).std == (0.2,) * 3
    with pytest.raises(ValueError, match="data.image_processor .*nowhere.*neither a preprocessor_config.json file"):
        _run_config(tmp_path, f"data.image_processor={tmp_path / 'nowhere'}")


def test_training_samples_carry_the_siglip_processors_pixels(tmp_path, llama_tok_dir, monkeypatch):
    """End to end through train/build.py: the dataset of a run with a SigLIP tower directory yields what LLaVA-
    NeXT's pad + SiglipImageProcessor make of the image (a CLIP-preprocessed sample would be off by ~0.1)."""
    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "cache"))
    model = Llava(tiny_config(vision=SIGLIP_TOWER))
    size = model.config.vision.image_size
    processor = _Siglip(size={"height": size, "width": size})
    processor.save_pretrained(tmp_path / "tower")
    (tmp_path / "images").mkdir()
    Image.fromarray(photo(90, 40)).save(tmp_path / "images" / "a.png")
    (tmp_path / "data.json").write_text(json.dumps([{"id": "0", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A test."}]}]))
    cfg = _run_config(tmp_path, f"data.data_path={tmp_path / 'data.json'}", f"data.image_folder={tmp_path / 'images'}",
                      "data.template=vicuna_v1", "data.image_mode=pad")
    sample = build_dataset(cfg, str(llama_tok_dir), model)[0]
    rgb = Image.open(tmp_path / "images" / "a.png").convert("RGB")
    err = (sample["pixel_values"][0] - reference(processor, rgb, "pad")).abs()  # DALI's tolerance: "auto" may take it
    assert err.mean() < DALI_MEAN_ATOL and err.max() < DALI_MAX_ATOL, (float(err.mean()), float(err.max()))
    clip = reference(_CLIP(size={"shortest_edge": size}, crop_size={"height": size, "width": size}), rgb, "pad")
    assert (sample["pixel_values"][0] - clip).abs().mean() > 0.1
