"""`python -m fastllava.eval` on a llava-hf LLaVA-NeXT (AnyRes) directory answers as transformers does.

The model is a tiny random LlavaNext directory with its tokenizer and a LlavaNextImageProcessor
preprocessor_config.json; POPE's six questions are each asked on their own random-pixel image, of six sizes
whose best grids differ (1x3, 3x1, 2x2, 1x2, 2x1, and a 3 x 200 strip). The reference is transformers:
LlavaNextImageProcessorPil read from the same file gives the pixels, image_sizes and (LlavaNextProcessor) the
number of placeholders, LlavaNextForConditionalGeneration.generate the greedy tokens. The prompt's tokens are
LLaVA's tokenizer_image_token of the vicuna_v1 prompt (the text around <image> tokenized piece by piece, as
LLaVA-NeXT's eval scripts do); LlavaNextProcessor tokenizes the whole text at once, which after <image> gives
one token fewer ("\\n" without SentencePiece's "▁") with this tokenizer, so only its count is used.
"""

import json

import numpy as np
import pytest
import torch
from hub_parquet import write_shards
from layout_vqa import _POPE_OFFSET, make_pope
from PIL import Image
from test_hub_tasks import POPE_SCHEMA
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from fastllava.data.templates import VICUNA_SYSTEM
from fastllava.data.tokenize import load_tokenizer
from fastllava.eval.run import main
from fastllava.eval.tasks.pope import POPE
from fastllava.testing import tiny_config, tiny_model, write_llama_tokenizer

TILE = 56
PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
# (height, width) of the six POPE images: best grids 1x3, 3x1, 2x2, 1x2, 2x1 and 1x3 again for a 3 x 200 strip
# (unpadding leaves none of its grid's feature rows: the base image's 16 tokens alone), so the prompts' visual
# tokens range from 16 to 88, and the prompts from 114 to 187 tokens.
SIZES = [(30, 130), (130, 30), (100, 90), (50, 100), (97, 41), (3, 200)]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    """A tiny llava-hf LLaVA-NeXT directory: config.json with the pinpoints, tokenizer, LlavaNextImageProcessor
    preprocessor_config.json (the file llava-hf's llava-v1.6 releases hold)."""
    path = tmp_path_factory.mktemp("llava_next")
    tokenizer = load_tokenizer(write_llama_tokenizer(path))
    config = tiny_config(vision={"image_size": TILE}, text={"vocab_size": 512, "max_position_embeddings": 512},
                         image_grid_pinpoints=PINPOINTS, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    tiny_model(config, seed=6).save_pretrained(path)  # a seed whose six answers all differ (seed 3: four)
    tokenizer.save_pretrained(str(path))
    LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                               image_grid_pinpoints=PINPOINTS).save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["model_type"] == "llava_next"
    return path


@pytest.fixture(scope="module")
def pope_layout(tmp_path_factory):
    """make_pope's questions, each re-pointed (with its label line) at its own random image of SIZES."""
    data = make_pope(tmp_path_factory.mktemp("pope"))
    pope = data / "pope"
    questions = [json.loads(line) for line in (pope / "llava_pope_test.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    labels = {}
    for k, (q, (h, w)) in enumerate(zip(questions, SIZES)):
        q["image"] = f"COCO_val2014_{k + 1:012d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(pope / "val2014" / q["image"])
        labels.setdefault(q["category"], []).append(q["image"])
    (pope / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    for split, images in labels.items():
        path = pope / "coco" / f"coco_pope_{split}.json"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "image": im}) + "\n" for r, im in zip(rows, images)))
    return data


def pope_parquet(layout, root):
    """lmms-lab/POPE's rows (its schema, split order and 1.. ids per split) for the layout's questions."""
    pope = layout / "pope"
    questions = [json.loads(line) for line in (pope / "llava_pope_test.jsonl").read_text().splitlines()]
    labels = {q.question_id: q.truth["label"] for q in POPE().load(layout, images=False)}
    rows = []
    for split in ("adversarial", "popular", "random"):
        for q in (q for q in questions if q["category"] == split):
            rows.append({"id": str(len(rows)), "question_id": str(q["question_id"] - _POPE_OFFSET[split]),
                         "question": q["text"].splitlines()[0], "answer": labels[q["question_id"]],
                         "image_source": q["image"], "category": split,
                         "image": {"bytes": (pope / "val2014" / q["image"]).read_bytes(), "path": None}})
    write_shards(root / "data", rows, POPE_SCHEMA)
    return root


def transformers_answers(model_dir, layout):
    """transformers' greedy answer to each POPE question (LLaVA's vicuna_v1 prompt), in question order."""
    tokenizer = load_tokenizer(model_dir)
    hf = LlavaNextForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil.from_pretrained(model_dir),
                                   tokenizer=tokenizer, patch_size=hf.config.vision_config.patch_size,
                                   vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
                                   num_additional_image_tokens=1)  # CLIP's CLS, which "default" drops
    image_id = hf.config.image_token_index
    answers = []
    for q in POPE().load(layout):
        text = f"{VICUNA_SYSTEM} USER: <image>\n{q.text} ASSISTANT:"
        with Image.open(q.images[0]) as im:
            inputs = processor(images=[im.convert("RGB")], text=[text], return_tensors="pt")
        count = int((inputs["input_ids"] == image_id).sum())
        before, after = text.split("<image>")
        ids = tokenizer(before)["input_ids"] + [image_id] * count + tokenizer(after)["input_ids"][1:]
        ids = torch.tensor([ids])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                              image_sizes=inputs["image_sizes"], do_sample=False, max_new_tokens=NEW_TOKENS,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


@pytest.fixture(scope="module")
def expected(next_dir, pope_layout):
    answers = transformers_answers(next_dir, pope_layout)
    # The premise: each question's answer is its own (two questions share their text and differ by the image),
    # so equal answers check every image's tiles.
    assert len(set(answers)) == len(answers), answers
    return answers


def _eval(model_dir, data, out, *extra):
    assert main(["--model", str(model_dir), "--task", "pope", "--data", str(data), "--output", str(out),
                 "--max-new-tokens", str(NEW_TOKENS), *extra]) == 0
    return [json.loads(line)["text"] for line in (out / "answers.jsonl").read_text().splitlines()]


def test_the_images_land_on_different_grids():
    from fastllava.anyres import select_best_resolution

    assert len({tuple(select_best_resolution(s, PINPOINTS)) for s in SIZES}) == len(PINPOINTS)


def test_layout_answers_equal_transformers(next_dir, pope_layout, expected, tmp_path):
    assert _eval(next_dir, pope_layout, tmp_path / "out") == expected


def test_hub_parquet_answers_equal_transformers(next_dir, pope_layout, expected, tmp_path):
    hub = pope_parquet(pope_layout, tmp_path / "POPE")
    assert _eval(next_dir, hub, tmp_path / "out") == expected


def test_batch_size_one_answers_as_continuous_batching(next_dir, pope_layout, tmp_path):
    """Prompts of 114 to 187 tokens decoded one at a time, and all six together in prefills of at most 300
    tokens (four waves of 2, 1, 1, 2 prompts, each prefilled while the earlier ones decode): the same answers."""
    one = _eval(next_dir, pope_layout, tmp_path / "one", "--max-batch-size", "1")
    many = _eval(next_dir, pope_layout, tmp_path / "many", "--max-batch-size", "6", "--prefill-tokens", "300")
    assert one == many


def test_the_comparison_sees_the_tiling(next_dir, pope_layout, expected, tmp_path, monkeypatch):
    """A control of the tests above: with each image's base image moved after its tiles (same pixels, same
    counts, LLaVA-NeXT's order broken) the answers are no longer transformers'."""
    import fastllava.generate.inputs as inputs

    tiling = inputs.preprocess_anyres
    monkeypatch.setattr(inputs, "preprocess_anyres", lambda im, spec: tiling(im, spec).roll(-1, 0))
    assert _eval(next_dir, pope_layout, tmp_path / "out") != expected
