"""GQA, VQAv2, VizWiz-VQA and TextVQA read from Hub parquet (fastllava/eval/hub.py) give the questions, answers
files, scores and upload files that LLaVA's layout gives for the same questions.

Each test writes tests/eval/layout_vqa.py's questions a second time as the lmms-lab repository lmms-eval's
task names holds them: its file names (GQA's two configs, VQAv2's testdev/validation shards, ...), the
columns the task reads with the real datasets' types (and some it does not read), images as {"bytes", "path"}
structs of the layout's image files, rows in the layout's order. `--data hub` goes through huggingface_hub
itself, offline, from its cache layout (GQA: both configs in one snapshot).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_parquet import IMAGE, hub_cache, offline_cache, same_questions, score_both, write_shards
from layout_vqa import (VIZWIZ_VAL, VQAV2_VAL, make_gqa, make_textvqa, make_vizwiz,
                        make_vizwiz_val, make_vqav2, make_vqav2_val)

from fastllava.eval.hub import read_rows
from fastllava.eval.run import load_questions, main, write_answers
from fastllava.eval.tasks.base import EvalDataError
from fastllava.eval.tasks.vqa import GQA, TextVQA, VizWiz, VQAv2

GQA_QUESTIONS = pa.schema([
    ("id", pa.string()), ("imageId", pa.string()), ("question", pa.string()), ("answer", pa.string()),
    ("fullAnswer", pa.string()), ("isBalanced", pa.bool_()),
    ("groups", pa.struct([("global", pa.string()), ("local", pa.string())])),
    ("entailed", pa.string()), ("equivalent", pa.string()),
    ("types", pa.struct([("detailed", pa.string()), ("semantic", pa.string()), ("structural", pa.string())])),
    ("semanticStr", pa.string())])
GQA_IMAGES = pa.schema([("id", pa.string()), ("image", IMAGE)])
VQAV2 = pa.schema([
    ("question_type", pa.string()), ("multiple_choice_answer", pa.string()),
    ("answers", pa.list_(pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()),
                                    ("answer_id", pa.int64())]))),
    ("image_id", pa.int64()), ("answer_type", pa.string()), ("question_id", pa.int64()),
    ("question", pa.string()), ("image", IMAGE)])
VIZWIZ = pa.schema([("question_id", pa.string()), ("image", IMAGE), ("question", pa.string()),
                    ("answers", pa.list_(pa.string())), ("category", pa.string())])
TEXTVQA = pa.schema([
    ("image_id", pa.string()), ("question_id", pa.int64()), ("question", pa.string()),
    ("question_tokens", pa.list_(pa.string())), ("image", IMAGE), ("image_width", pa.int64()),
    ("image_height", pa.int64()), ("flickr_original_url", pa.string()), ("flickr_300k_url", pa.string()),
    ("answers", pa.list_(pa.string())), ("image_classes", pa.list_(pa.string())), ("set_name", pa.string()),
    ("ocr_tokens", pa.list_(pa.string()))])


def shards(folder, split, rows, schema, n=2):
    """write_shards, named <split>-0000k-of-0000n.parquet as the repository names that split's files."""
    write_shards(folder, rows, schema, shards=n)
    if split != "test":
        for f in folder.glob("test-*.parquet"):
            f.rename(f.with_name(split + f.name[len("test"):]))


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _image(path):
    return {"bytes": path.read_bytes(), "path": path.name}


def _scores(tmp_path, name, data, answers, *extra):
    assert main(["--task", name, "--data", str(data), "--answers", str(answers), "--output", str(tmp_path / name),
                 *extra]) == 0
    return json.loads((tmp_path / name / "scores.json").read_text())["scores"]


def _loaded(task, layout, hub):
    """The task's questions from the Hub rows under `hub` and from the layout, checked equal."""
    from_hub, from_layout = task.load_hub(read_rows(hub, task.hub)), task.load(layout)
    same_questions(from_hub, from_layout)
    return from_hub, from_layout


def _same_answers_file(tmp_path, hub, layout, texts):
    write_answers(tmp_path / "a_hub.jsonl", hub, texts, "m")
    write_answers(tmp_path / "a_layout.jsonl", layout, texts, "m")
    assert (tmp_path / "a_hub.jsonl").read_bytes() == (tmp_path / "a_layout.jsonl").read_bytes()
    return tmp_path / "a_layout.jsonl"


# ----------------------------------------------------------------------------- GQA


def gqa_parquet(layout, root):
    """lmms-lab/GQA's testdev_balanced_instructions (make_gqa's questions and GQA's answers for them) and
    testdev_balanced_images (one row per image, in another order than the questions name them)."""
    gqa = layout / "gqa"
    gold = json.loads((gqa / "data" / "testdev_balanced_questions.json").read_text())
    rows = [{**{k: gold[q["question_id"]][k] for k in ("imageId", "question", "answer", "fullAnswer", "isBalanced",
                                                       "groups", "types", "semanticStr")},
             "id": q["question_id"], "entailed": "[]", "equivalent": json.dumps([q["question_id"]])}
            for q in _jsonl(gqa / "llava_gqa_testdev_balanced.jsonl")]
    shards(root / "testdev_balanced_instructions", "testdev", rows, GQA_QUESTIONS, n=1)
    images = sorted((gqa / "data" / "images").iterdir(), reverse=True)
    shards(root / "testdev_balanced_images", "testdev", [{"id": p.stem, "image": _image(p)} for p in images],
           GQA_IMAGES, n=1)
    return root


def test_gqa_from_hub_parquet_equals_llava_layout(tmp_path):
    layout = make_gqa(tmp_path / "l")
    hub = gqa_parquet(layout, tmp_path / "GQA")
    from_hub, from_layout = _loaded(GQA(), layout, hub)
    assert from_hub[0].images[0] is from_hub[3].images[0]  # one image, decoded once for its two questions
    answers = _same_answers_file(tmp_path, from_hub, from_layout, ["No", "Woman.", "yes", "blue"])
    by_layout, by_hub = _scores(tmp_path / "l", "gqa", layout, answers), _scores(tmp_path / "h", "gqa", hub, answers)
    assert by_hub == by_layout == {"accuracy": 75.0, "binary": 50.0, "open": 100.0}
    predictions = "gqa/testdev_balanced_predictions.json"  # what GQA's eval.py reads, byte for byte
    assert (tmp_path / "h" / predictions).read_bytes() == (tmp_path / "l" / predictions).read_bytes()


def test_gqa_question_naming_an_image_not_in_the_images_config_is_named(tmp_path):
    hub = gqa_parquet(make_gqa(tmp_path / "l"), tmp_path / "GQA")
    file = next((hub / "testdev_balanced_images").iterdir())
    pq.write_table(pq.read_table(file).filter(pa.compute.field("id") != "n235859"), file)
    with pytest.raises(EvalDataError, match=r"testdev-00000-of-00001.parquet: row 1: imageId 'n235859' has no row "
                                            r"with that id in testdev_balanced_images/testdev-\*.parquet of lmms-lab/GQA"):
        read_rows(hub, GQA.hub)
    for f in (hub / "testdev_balanced_images").iterdir():
        f.unlink()
    with pytest.raises(EvalDataError, match=r"no parquet file \(expected testdev_balanced_images/testdev-\*.parquet"):
        read_rows(hub, GQA.hub)


def test_data_hub_reads_both_gqa_configs_offline_through_huggingface_hub(tmp_path, monkeypatch):
    layout = make_gqa(tmp_path / "l")
    hub = gqa_parquet(layout, tmp_path / "GQA")
    cache = tmp_path / "hf"
    hub_cache(cache, "lmms-lab/GQA", {str(p.relative_to(hub)): p.read_bytes() for p in hub.rglob("*.parquet")})
    offline_cache(monkeypatch, cache)
    same_questions(load_questions(GQA(), "hub"), GQA().load(layout))
    write_answers(tmp_path / "a.jsonl", GQA().load(layout), ["no", "man", "no", "blue"], "m")
    by_layout, by_hub = score_both(tmp_path, "gqa", layout, "hub", tmp_path / "a.jsonl")
    assert by_hub == by_layout == {"accuracy": 75.0, "binary": 100.0, "open": 50.0}


# ----------------------------------------------------------------------------- VQAv2


def vqav2_rows(questions, image_file, answers=None):
    """lmms-lab/VQAv2 rows: [(question_id, image_id, question)] with the image bytes; answers (val) by
    question_id, else null as in the testdev split."""
    rows = []
    for qid, image_id, question in questions:
        human = None if answers is None else [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                              for k, a in enumerate(answers[qid])]
        rows.append({"question_type": None if human is None else "what", "answers": human,
                     "multiple_choice_answer": None if human is None else human[0]["answer"],
                     "image_id": image_id, "answer_type": None, "question_id": qid, "question": question,
                     "image": _image(image_file(image_id))})
    return rows


def _without_truth(q):
    return type(q)(q.question_id, q.text, q.images, q.record, {})


def test_vqav2_test_dev_from_hub_parquet_equals_llava_layout(tmp_path, caplog):
    layout = make_vqav2(tmp_path / "l")
    d = layout / "vqav2"
    dev = [(q["question_id"], int(q["image"][-16:-4]), q["text"].split("\n")[0])
           for q in _jsonl(d / "llava_vqav2_mscoco_test-dev2015.jsonl")]
    shards(tmp_path / "VQAv2" / "data", "testdev",
           vqav2_rows(dev, lambda i: d / "test2015" / f"COCO_test2015_{i:012d}.jpg"), VQAV2)
    task = VQAv2()
    from_hub, from_layout = task.load_hub(read_rows(tmp_path / "VQAv2", task.hub)), task.load(layout)
    same_questions([_without_truth(q) for q in from_hub], [_without_truth(q) for q in from_layout])
    assert [q.truth for q in from_hub] == [{"full_split": None}] * 3
    answers = _same_answers_file(tmp_path, from_hub, from_layout, ["Yes.", "Baseball", "2"])
    assert _scores(tmp_path / "l", "vqav2", layout, answers) == _scores(tmp_path / "h", "vqav2", tmp_path / "VQAv2", answers) == {}
    assert "the VQAv2 EvalAI server expects every test2015 question" in caplog.text
    upload = "vqav2/answers_upload/llava_vqav2_mscoco_test-dev2015.json"
    padded = json.loads((tmp_path / "l" / upload).read_text())
    # The Hub's upload: the layout's rows of the answered questions, without the padding of the others.
    assert json.loads((tmp_path / "h" / upload).read_text()) == [r for r in padded if r["answer"]] == [
        {"question_id": 262144000, "answer": "yes"}, {"question_id": 262144001, "answer": "baseball"},
        {"question_id": 393225000, "answer": "2"}]
    assert len(padded) == 5


def test_vqav2_val_from_hub_parquet_equals_llava_layout(tmp_path):
    layout = make_vqav2_val(tmp_path / "l")
    val = [(qid, image_id, question) for qid, (image_id, question, _) in VQAV2_VAL.items()]
    shards(tmp_path / "VQAv2" / "data", "validation",
           vqav2_rows(val, lambda i: layout / "vqav2" / "val2014" / f"COCO_val2014_{i:012d}.jpg",
                      {qid: a for qid, (_, _, a) in VQAV2_VAL.items()}), VQAV2, n=1)
    task = VQAv2(split="val")
    assert task.hub.pattern == "data/validation-*.parquet" and VQAv2().hub.pattern == "data/testdev-*.parquet"
    _, from_layout = _loaded(task, layout, tmp_path / "VQAv2")
    write_answers(tmp_path / "a.jsonl", from_layout, ["2", "yes", "black"], "m")
    by_layout = _scores(tmp_path / "l", "vqav2", layout, tmp_path / "a.jsonl", "--split", "val")
    by_hub = _scores(tmp_path / "h", "vqav2", tmp_path / "VQAv2", tmp_path / "a.jsonl", "--split", "val")
    assert by_hub == by_layout and by_hub["val_accuracy"] == pytest.approx(100 * (0.9 + 1 + 1) / 3)


# ----------------------------------------------------------------------------- VizWiz


def vizwiz_rows(folder, questions):
    """lmms-lab/VizWiz-VQA rows: question_id the image's stem, answers strings (empty on test)."""
    return [{"question_id": name.removesuffix(".jpg"), "image": _image(folder / name), "question": question,
             "answers": answers, "category": "unanswerable" if "unanswerable" in answers else "other"}
            for name, (question, answers) in questions.items()]


def test_vizwiz_test_from_hub_parquet_equals_llava_layout(tmp_path):
    layout = make_vizwiz(tmp_path / "l")
    path = layout / "vizwiz" / "llava_test.jsonl"
    # A question as VizWiz users typed it, lower-case first (lmms-eval capitalizes it; LLaVA does not).
    path.write_text(path.read_text().replace("What is this? and what color", "what is this? and what color"))
    lines = _jsonl(path)
    rows = vizwiz_rows(layout / "vizwiz" / "test", {q["image"]: (q["text"].split("\n")[0], []) for q in lines})
    shards(tmp_path / "VizWiz" / "data", "test", rows, VIZWIZ)
    from_hub, from_layout = _loaded(VizWiz(), layout, tmp_path / "VizWiz")
    answers = _same_answers_file(tmp_path, from_hub, from_layout, ["A can of soup.", "Unanswerable", "No"])
    assert _scores(tmp_path / "l", "vizwiz", layout, answers) == _scores(tmp_path / "h", "vizwiz", tmp_path / "VizWiz", answers) == {}
    upload = "vizwiz/answers_upload/vizwiz_test.json"  # what the EvalAI server reads, byte for byte
    assert (tmp_path / "h" / upload).read_bytes() == (tmp_path / "l" / upload).read_bytes()
    assert json.loads((tmp_path / "h" / upload).read_text())[0] == {"image": "VizWiz_test_00000000.jpg", "answer": "can of soup"}


def test_vizwiz_val_from_hub_parquet_equals_llava_layout(tmp_path):
    layout = make_vizwiz_val(tmp_path / "l")
    shards(tmp_path / "VizWiz" / "data", "val", vizwiz_rows(layout / "vizwiz" / "val", VIZWIZ_VAL), VIZWIZ)
    from_hub, from_layout = _loaded(VizWiz(split="val"), layout, tmp_path / "VizWiz")
    answers = _same_answers_file(tmp_path, from_hub, from_layout, ["soup", "blue", "yes"])
    by_layout = _scores(tmp_path / "l", "vizwiz", layout, answers, "--split", "val")
    by_hub = _scores(tmp_path / "h", "vizwiz", tmp_path / "VizWiz", answers, "--split", "val")
    assert by_hub == by_layout and by_hub["val_accuracy"] == pytest.approx(100 * (0.9 + 1 + 1) / 3)
    upload = "vizwiz/answers_upload/vizwiz_val.json"
    assert (tmp_path / "h" / upload).read_bytes() == (tmp_path / "l" / upload).read_bytes()


def test_vizwiz_row_with_a_foreign_id_is_named(tmp_path):
    layout = make_vizwiz(tmp_path / "l")
    rows = vizwiz_rows(layout / "vizwiz" / "test", {"VizWiz_test_00000000.jpg": ("What is this?", [])})
    rows[0]["question_id"] = "VizWiz_val_00000000"
    shards(tmp_path / "VizWiz" / "data", "test", rows, VIZWIZ, n=1)
    with pytest.raises(EvalDataError, match="row 0: expected a question_id VizWiz_test_<number>, got 'VizWiz_val_00000000'"):
        VizWiz().load_hub(read_rows(tmp_path / "VizWiz", VizWiz.hub))


# ----------------------------------------------------------------------------- TextVQA


def textvqa_parquet(layout, root):
    """lmms-lab/textvqa's validation rows for make_textvqa's questions: the OCR tokens of LLaVA's prompt as
    ocr_tokens, TEXTVQA_ANSWERS as answers, TextVQA's question ids."""
    d = layout / "textvqa"
    annotations = {(e["image_id"], e["question"]): e for e in json.loads((d / "TextVQA_0.5.1_val.json").read_text())["data"]}
    rows = []
    for q in _jsonl(d / "llava_textvqa_val_v051_ocr.jsonl"):
        question, ocr, _ = q["text"].split("\n")
        tokens = ocr.removeprefix("Reference OCR token: ")
        entry = annotations[q["question_id"], question.lower()]
        rows.append({**{k: entry[k] for k in ("image_id", "question_id", "question_tokens", "image_width",
                                              "image_height", "flickr_original_url", "flickr_300k_url", "answers",
                                              "image_classes", "set_name")},
                     "question": question, "image": _image(d / "train_images" / q["image"]),
                     "ocr_tokens": tokens.split(", ") if tokens else []})
    shards(root / "data", "validation", rows, TEXTVQA)
    return root


def test_textvqa_from_hub_parquet_equals_llava_layout(tmp_path):
    layout = make_textvqa(tmp_path / "l")
    hub = textvqa_parquet(layout, tmp_path / "textvqa")
    from_hub, from_layout = _loaded(TextVQA(), layout, hub)
    assert [q.question_id for q in from_hub][1:3] == ["831bcec304a17054#1", "831bcec304a17054#2"]
    answers = _same_answers_file(tmp_path, from_hub, from_layout, ["Dakota Digital", "bowmore", "10 years", "thirty"])
    by_layout, by_hub = _scores(tmp_path / "l", "textvqa", layout, answers), _scores(tmp_path / "h", "textvqa", hub, answers)
    # TEXTVQA_ANSWERS: "dakota digital" 3 of 10 (0.9), "thirty" 2 of 10 (0.6), the others 1.
    assert by_hub == by_layout == {"accuracy": pytest.approx(100 * (0.9 + 1 + 1 + 0.6) / 4)}
