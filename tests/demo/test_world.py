"""The demo dataset: answers agree with the drawn pixels, sizes are non-square, generation is deterministic
and cached, and the tokenizer built in code round-trips with single-token specials."""

import json

import numpy as np
import pytest
from PIL import Image

from fastllava.demo import world
from fastllava.demo.world import COLORS, POSITIONS, RESPONSE_FORMAT, make_demo_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "d", n_train=120, n_eval=30, seed=3)


def _nearest_color(rgb) -> str:
    return min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLORS[c], rgb)))


def test_json_is_llava_format_with_consistent_types(demo):
    for path in (demo.train_json, demo.eval_json):
        data = json.loads(path.read_text())
        assert data and len({s["id"] for s in data}) == len(data)
        for s in data:
            turns = s["conversations"]
            assert len(turns) >= 2 and len(turns) % 2 == 0
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert len(s["question_types"]) == len(turns) // 2
            n_tags = sum(t["value"].count("<image>") for t in turns)
            if "image" in s:
                assert n_tags == 1 and turns[0]["value"].startswith("<image>\n")
                assert (demo.image_folder / s["image"]).is_file()
            else:
                assert n_tags == 0 and set(s["question_types"]) == {"text"}
            if "describe" in s["question_types"]:  # last, so no short answer can be copied from it
                assert s["question_types"].index("describe") == len(s["question_types"]) - 1
            for human, qtype in zip(turns[0::2], s["question_types"]):
                assert human["value"].endswith(RESPONSE_FORMAT) == (qtype != "describe")
    evals = json.loads(demo.eval_json.read_text())
    for s in evals:
        if "image" in s:  # every held-out image asks each visual type once
            assert sorted(s["question_types"]) == ["color", "count", "position", "shape"]
    train_types = {t for s in json.loads(demo.train_json.read_text()) for t in s["question_types"]}
    assert train_types == {"color", "count", "position", "shape", "describe", "text"}
    captions = json.loads(demo.pretrain_json.read_text())
    assert captions and all(c["conversations"][0]["value"] == "<image>" for c in captions)


def _read_cells(path) -> dict[str, tuple[str, str]]:
    """{position: (colour, kind)} recovered from the JPEG alone: a cell holds a shape when enough of it is
    saturated (backgrounds are grey); the colour is the nearest palette entry to the median saturated
    pixel; the kind follows from how much of its bounding box the shape fills (square ~1, circle ~pi/4,
    triangle ~1/2)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    height, width, _ = pixels.shape
    found = {}
    for cell, name in enumerate(POSITIONS):
        row, col = divmod(cell, 2)
        block = pixels[row * height // 2 : (row + 1) * height // 2, col * width // 2 : (col + 1) * width // 2]
        colored = block.max(2) - block.min(2) > 80
        if colored.sum() < 0.05 * colored.size:
            continue
        ys, xs = np.nonzero(colored)
        fill = colored.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        kind = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
        found[name] = (_nearest_color(np.median(block[colored], axis=0)), kind)
    return found


def test_answers_match_pixels(demo):
    """Every held-out answer agrees with what the JPEG shows, and no question names what it asks."""
    checked = 0
    for s in json.loads(demo.eval_json.read_text()):
        if "image" not in s:
            continue
        cells = _read_cells(demo.image_folder / s["image"])
        q = dict(zip(s["question_types"], (t["value"].split("\n")[-2] for t in s["conversations"][0::2])))
        a = dict(zip(s["question_types"], (t["value"] for t in s["conversations"][1::2])))
        where = f"{s['id']}: {cells} vs {a}"
        assert a["count"] == str(len(cells)), where
        assert set(cells.values()) == {(a["color"], a["shape"])}, where  # copies of one coloured shape
        assert a["position"] == " and ".join(", ".join(p for p in POSITIONS if p in cells).rsplit(", ", 1)), where
        for qtype, question in q.items():
            assert question in world.QUESTIONS[qtype], where
        checked += 1
    assert checked >= 20
    # The stage-1 captions describe the same pictures.
    for c in json.loads(demo.pretrain_json.read_text())[:30]:
        cells = _read_cells(demo.image_folder / c["image"])
        expected = world.describe(
            [world.Shape(k, col, POSITIONS.index(pos), (0, 0, 0, 0)) for pos, (col, k) in cells.items()]
        )
        assert c["conversations"][1]["value"] == expected


def test_scene_shapes_are_where_they_are_said(demo):
    """draw_scene's own records: the probe pixel of each shape has the shape's colour (after JPEG)."""
    import random

    rng = random.Random(0)
    for _ in range(50):
        size = rng.choice(world.DEFAULT_IMAGE_SIZES)
        image, shapes = world.draw_scene(rng, size)
        assert image.size == size
        cells = [s.cell for s in shapes]
        assert len(set(cells)) == len(cells) and len({(s.color, s.kind) for s in shapes}) == 1
        path = demo.root.parent / "probe.jpg"
        image.save(path, format="JPEG", quality=90)
        back = Image.open(path).convert("RGB")
        for s in shapes:
            x, y = s.probe
            assert _nearest_color(back.getpixel((x, y))) == s.color, (s, back.getpixel((x, y)))
            row, col = divmod(s.cell, 2)
            assert col * size[0] // 2 <= s.box[0] and s.box[2] < (col + 1) * size[0] // 2
            assert row * size[1] // 2 <= s.box[1] and s.box[3] < (row + 1) * size[1] // 2


def test_images_are_non_square_in_several_sizes(demo):
    sizes = set()
    for s in json.loads(demo.train_json.read_text()):
        if "image" in s:
            with Image.open(demo.image_folder / s["image"]) as im:
                assert im.format == "JPEG"
                sizes.add(im.size)
    assert sizes == set(world.DEFAULT_IMAGE_SIZES)
    assert sum(w != h for w, h in sizes) >= 3


def test_deterministic_and_cached(tmp_path, demo):
    again = make_demo_dataset(tmp_path / "again", n_train=120, n_eval=30, seed=3)
    for name in ("train.json", "eval.json", "pretrain.json", "tokenizer/tokenizer.json"):
        assert (again.root / name).read_bytes() == (demo.root / name).read_bytes(), name
    first = json.loads(demo.train_json.read_text())
    img = first[[i for i, s in enumerate(first) if "image" in s][0]]["image"]
    assert (again.image_folder / img).read_bytes() == (demo.image_folder / img).read_bytes()
    other = make_demo_dataset(tmp_path / "other", n_train=120, n_eval=30, seed=4)
    assert other.train_json.read_bytes() != demo.train_json.read_bytes()
    # A second call finds the marker and does nothing (no rewrite: modification time unchanged).
    stamp = demo.train_json.stat().st_mtime_ns
    assert make_demo_dataset(demo.root, n_train=120, n_eval=30, seed=3) == demo
    assert demo.train_json.stat().st_mtime_ns == stamp


def test_cache_replaces_stale_datasets_and_refuses_foreign_directories(tmp_path):
    root = tmp_path / "stale"
    make_demo_dataset(root, n_train=8, n_eval=4)
    (root / "images" / "train" / "extra.jpg").write_bytes(b"old")
    paths = make_demo_dataset(root, n_train=9, n_eval=4)  # other parameters: rebuilt in place
    assert len(json.loads(paths.train_json.read_text())) == 9
    assert not (root / "images" / "train" / "extra.jpg").exists()
    assert world.is_complete(root, n_train=9, n_eval=4, seed=0, image_sizes=world.DEFAULT_IMAGE_SIZES,
                                 text_fraction=0.1, describe_fraction=1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["stale"]  # no temporary or old copies left
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a demo dataset"):
        make_demo_dataset(foreign, n_train=10, n_eval=5)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="too small"):
        make_demo_dataset(tmp_path / "x", n_train=10, n_eval=5, image_sizes=[(20, 40)])


def test_default_cache_dir_follows_env_and_params(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path))
    params = dict(n_train=5, n_eval=2, seed=0, image_sizes=[(64, 48)], text_fraction=0.1, describe_fraction=1.0)
    a = world.default_cache_dir(**params)
    assert a.parent == tmp_path and a == world.default_cache_dir(**params)
    assert a != world.default_cache_dir(**{**params, "seed": 1})
    paths = make_demo_dataset(n_train=5, n_eval=2, image_sizes=[(64, 48)])
    assert paths.root == a and (a / "COMPLETE.json").is_file()


def test_tokenizer_round_trips_with_single_token_specials(demo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo.tokenizer_dir))
    assert tok.is_fast and len(tok) < 600
    for special in ("<s>", "</s>", "<unk>", "<pad>", "<image>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id or special == "<unk>", (special, ids)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    texts = [t["value"] for s in json.loads(demo.eval_json.read_text()) for t in s["conversations"]]
    for text in texts[:200]:
        enc = tok(text)
        assert enc["input_ids"][0] == tok.bos_token_id
        assert tok.unk_token_id not in enc["input_ids"], text
        assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text.replace("<image>", "")
    # Corpus words are single tokens (why the vocabulary and sequences stay small).
    for word in ("red", "triangle", "bottom", "ASSISTANT:"):
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    enc = tok("USER: hi</s>", return_offsets_mapping=True)
    assert len(enc["offset_mapping"]) == len(enc["input_ids"])


def test_tokenizer_works_with_the_vicuna_and_plain_templates(demo):
    from fastllava.batch import IGNORE_INDEX
    from fastllava.data.tokenize import load_tokenizer, tokenize_conversation

    tok = load_tokenizer(demo.tokenizer_dir)
    sample = next(s for s in json.loads(demo.train_json.read_text()) if "image" in s)
    ids, labels = tokenize_conversation(sample["conversations"], tok, "vicuna_v1")
    assert tok.unk_token_id not in ids.tolist()
    assert (ids == tok.convert_tokens_to_ids("<image>")).sum() == 1
    # The labelled tokens decode to exactly the answers, each followed by "</s>".
    pieces = []
    labelled = (labels != IGNORE_INDEX).tolist() + [False]
    start = None
    for i, flag in enumerate(labelled):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            pieces.append(tok.decode(ids[start:i]).strip())
            start = None
    assert pieces == [t["value"] + "</s>" for t in sample["conversations"][1::2]]
    caption = json.loads(demo.pretrain_json.read_text())[0]
    ids, labels = tokenize_conversation(caption["conversations"], tok, "plain")
    assert tok.unk_token_id not in ids.tolist()
    assert tok.decode(ids[labels != IGNORE_INDEX]) == caption["conversations"][1]["value"] + "\n"
