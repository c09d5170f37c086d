"""LlavaDataset with image_mode "anyres" (LLaVA-NeXT): every sample's length comes from its images' header
sizes before any pixel is decoded, and equals the length of the pack the loader builds from the decoded tiles.

The references are independent of fastllava's count: the decoded image's size (Pillow, EXIF orientation
applied) and transformers' own tile count (image_size_to_num_patches) for it; the lengths are checked against
the packs PackedBatch.from_samples builds from dataset[i], whose tiles it checks against the sizes. The tower is
a 56 px one (4 x 4 patches of 14), the pinpoints LLaVA-NeXT's scaled by 1/6, as tests/model/test_llava_next.py.
"""

import json

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from fastllava import PackedBatch
from fastllava.batch import AnyResGrid
from fastllava.data.dataset import LlavaDataset, anyres_loader
from fastllava.data.files import image_list
from fastllava.data.images import Preprocess
from fastllava.data.loader import StepLoader

TILE, SIDE = 56, 4
PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
GRID = AnyResGrid(tuple(map(tuple, PINPOINTS)), TILE, SIDE)
# (height, width): each grid of PINPOINTS, a 1 x N and an N x 1 strip, a very large image
SIZES = [(30, 130), (130, 30), (100, 90), (50, 100), (97, 41), (1, 300), (300, 1), (3000, 4000)]


def _write_images(folder) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for k, (h, w) in enumerate(SIZES):
        if h * w > 10**6:  # a flat colour: large, quick to write and to decode
            img = Image.new("RGB", (w, h), (200, 30, 90))
        else:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        names.append(f"im{k}.png")
        img.save(folder / names[-1])
    # A JPEG stored landscape with EXIF orientation 6 (a quarter turn): its decoded image is portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (40, 150, 3), dtype=np.uint8)).save(folder / "turned.jpg", exif=exif)
    return names + ["turned.jpg"]


def _record(k, images, answer="a short answer here"):
    """One turn per image (a text-only sample: one turn without), each answered."""
    turns = []
    for tag in ["<image>\n" for _ in images] or [""]:
        turns += [{"from": "human", "value": tag + "What is shown?"}, {"from": "gpt", "value": answer}]
    entry = {"id": str(k), "conversations": turns}
    if images:
        entry["image"] = images[0] if len(images) == 1 else images
    return entry


@pytest.fixture
def layout(tmp_path):
    (tmp_path / "images").mkdir()
    names = _write_images(tmp_path / "images")
    records = [_record(k, [n]) for k, n in enumerate(names)]
    records += [_record(len(records), []), _record(len(records) + 1, [names[0], names[3]])]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def _dataset(layout, tokenizer, grid=GRID, **kwargs):
    kwargs.setdefault("cache_dir", layout / "cache")
    return LlavaDataset(layout / "data.json", layout / "images", tokenizer, "vicuna_v1", image_mode="anyres",
                        image_size=TILE, num_image_tokens=SIDE * SIDE, anyres=grid, verbose=False,
                        image_loader=anyres_loader(Preprocess(TILE, TILE), grid), length_workers=1, **kwargs)


def _pack(dataset, samples):
    return PackedBatch.from_samples(samples, image_token_id=dataset.image_token_id,
                                    num_image_tokens=SIDE * SIDE, anyres=dataset.anyres)


def test_lengths_from_headers_equal_the_decoded_tiles(layout, llama_tok):
    dataset = _dataset(layout, llama_tok, model_max_length=4096)
    lengths = dataset.lengths()
    assert dataset.valid().all()
    for i in range(len(dataset)):
        sample = dataset[i]
        batch = _pack(dataset, [sample])
        assert batch.num_tokens == lengths[i], dataset.describe_sample(i)
        paths = [layout / "images" / p for p in image_list(dataset.records[i])]
        assert len(batch.image_sizes or ()) == len(paths)
        for path, size, tiles in zip(paths, batch.image_sizes, batch.image_tile_counts):
            with Image.open(path) as img:
                decoded = ImageOps.exif_transpose(img).size[::-1]  # (height, width) as the pixels are used
            assert size == decoded, path
            assert tiles == image_size_to_num_patches(list(decoded), PINPOINTS, TILE), path
    # the EXIF-turned JPEG is counted portrait, as it is decoded
    turned = [i for i in range(len(dataset)) if dataset.records[i].get("image") == "turned.jpg"][0]
    assert dataset[turned]["image_sizes"] == [(150, 40)]


def test_loader_packs_hold_the_planned_lengths(layout, llama_tok):
    dataset = _dataset(layout, llama_tok, model_max_length=4096)
    lengths = dataset.lengths()
    loader = StepLoader(dataset, global_batch=4, max_tokens=4096, rank=0, world_size=1, epochs=1, seed=0,
                        image_token_id=dataset.image_token_id, num_image_tokens=SIDE * SIDE,
                        anyres=GRID)
    seen = []
    for step, micro in loader:
        for mb in micro:
            plan = loader.plan(step).rank(0)[mb.micro]
            assert mb.batch.num_tokens == int(lengths[list(plan)].sum())
            seen += list(plan)
    assert sorted(seen) == list(range(len(dataset)))


def test_overlong_samples_are_never_cut_inside_an_image(layout, llama_tok):
    """With model_max_length between one and two images' tokens, the two-image sample keeps its first image
    whole and drops the second; every length stays within the limit and equals its pack's."""
    full = _dataset(layout, llama_tok, model_max_length=4096)
    two = len(full) - 1
    first = GRID.num_tokens(SIZES[0])
    limit = int(full.lengths()[two]) - GRID.num_tokens(SIZES[3]) // 2  # cuts into the second image
    assert limit > first + 20
    dataset = _dataset(layout, llama_tok, model_max_length=limit, cache_dir=False)
    lengths = dataset.lengths()
    assert (lengths <= limit).all() and dataset.num_truncated >= 1
    sample = dataset[two]
    assert sample["image_sizes"] == [SIZES[0]]
    batch = _pack(dataset, [sample])
    assert batch.num_tokens == lengths[two] and batch.image_token_counts == (first,)


def test_cache_key_holds_the_grid(layout, llama_tok):
    first = _dataset(layout, llama_tok)
    lengths = first.lengths().copy()
    assert first.lengths_computed == 1
    again = _dataset(layout, llama_tok)
    np.testing.assert_array_equal(again.lengths(), lengths)
    assert again.lengths_computed == 0  # read from the cache
    wide_only = AnyResGrid(((56, 168),), TILE, SIDE)
    other = _dataset(layout, llama_tok, grid=wide_only)
    assert other.lengths_computed == 0 and not np.array_equal(other.lengths(), lengths)
    assert other.lengths_computed == 1  # computed: another grid, another key


def test_unreadable_header_rejects_the_sample_at_lengths(layout, llama_tok):
    (layout / "images" / "im0.png").write_bytes(b"not an image")
    dataset = _dataset(layout, llama_tok, cache_dir=False)
    valid = dataset.valid()
    bad = [i for i in range(len(dataset)) if "im0.png" in json.dumps(dataset.records[i].get("image"))]
    assert bad and not valid[bad].any() and valid.sum() == len(dataset) - len(bad)
    assert dataset.rejects.counts.get("image") == len(bad)
    assert dataset[bad[0]] is None


def test_image_mode_and_grid_go_together(layout, llama_tok):
    with pytest.raises(ValueError, match="image_mode 'anyres' needs the model's AnyRes grid"):
        LlavaDataset(layout / "data.json", layout / "images", llama_tok, "vicuna_v1", image_mode="anyres",
                     verbose=False, cache_dir=False)
    with pytest.raises(ValueError, match="the grid needs image_mode 'anyres'"):
        LlavaDataset(layout / "data.json", layout / "images", llama_tok, "vicuna_v1", image_mode="pad",
                     anyres=GRID, verbose=False, cache_dir=False)


def test_an_image_resized_after_its_length_was_cached_is_rejected_by_name(layout, llama_tok):
    """The cache key holds the data file, not every image: an image replaced by one of another size is caught
    when its sample is loaded (its pack was planned at the cached length), naming the images and the cache."""
    _dataset(layout, llama_tok).lengths()
    Image.new("RGB", (40, 400)).save(layout / "images" / "im0.png")  # 400 x 40 (height x width), was 30 x 130
    dataset = _dataset(layout, llama_tok)
    dataset.lengths()
    assert dataset.lengths_computed == 0  # the stale cache
    first = [i for i in range(len(dataset)) if image_list(dataset.records[i]) == ["im0.png"]][0]
    assert dataset[first] is None
    assert dataset.rejects.counts.get("image") == 1
    strict = _dataset(layout, llama_tok, strict=True)
    strict.lengths()
    with pytest.raises(ValueError, match=r"im0.png.*changed size since the lengths were computed"):
        strict[first]
