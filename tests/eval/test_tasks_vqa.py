"""VQAv2, GQA, VizWiz, TextVQA, POPE and ScienceQA tasks on the tiny LLaVA layouts of layout_vqa.py: what
load() reads, what score() returns and writes (metrics worked out by hand from the layouts' contents), and
the errors for bad input."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from layout_vqa import (SHORT, SQA_HINT, VIZWIZ_HINT, make_gqa, make_pope, make_scienceqa, make_textvqa,
                        make_vizwiz, make_vizwiz_val, make_vqav2, make_vqav2_val)

from fastllava.eval.tasks import make_task
from fastllava.eval.tasks.base import EvalDataError
from fastllava.eval.tasks.pope import POPE
from fastllava.eval.tasks.scienceqa import ScienceQA
from fastllava.eval.tasks.vqa import GQA, TextVQA, VizWiz, VQAv2


def _read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- VQAv2


def test_vqav2_load_and_upload(tmp_path, caplog):
    data = make_vqav2(tmp_path)
    qs = VQAv2().load(data)
    assert [q.question_id for q in qs] == [262144000, 262144001, 393225000]
    assert qs[0].text == f"Is the ball flying towards the batter?\n{SHORT}"
    assert qs[2].images == [data / "vqav2" / "test2015" / "COCO_test2015_000000393225.jpg"]
    assert all(q.record == {} for q in qs)
    with caplog.at_level(logging.INFO):
        scores = VQAv2().score(qs, ["Yes", "Baseball.", "Two"], tmp_path / "out")
    assert scores == {}
    # Every test2015 question, in that file's order; normalized answers; "" where not answered.
    assert _read(tmp_path / "out" / "answers_upload" / "llava_vqav2_mscoco_test-dev2015.json") == [
        {"question_id": 262144000, "answer": "yes"}, {"question_id": 262144001, "answer": "baseball"},
        {"question_id": 262144002, "answer": ""}, {"question_id": 393225000, "answer": "2"},
        {"question_id": 524291000, "answer": ""}]
    assert "no local score" in caplog.text


def test_vqav2_needs_full_test_list_before_generation(tmp_path):
    data = make_vqav2(tmp_path)
    (data / "vqav2" / "llava_vqav2_mscoco_test2015.jsonl").unlink()
    with pytest.raises(EvalDataError, match="llava_vqav2_mscoco_test2015.jsonl: missing") as e:
        VQAv2().load(data)
    assert e.value.line is None


def test_vqav2_splits():
    assert VQAv2.splits == ("test-dev", "val")
    assert VQAv2().split == "test-dev" and make_task("vqav2").split == "test-dev"
    assert make_task("vqav2", split="val").split == "val"
    with pytest.raises(ValueError, match=r"no split 'test'.*test-dev, val"):
        VQAv2(split="test")


def test_vqav2_val_load(tmp_path):
    data = make_vqav2_val(tmp_path)
    qs = VQAv2(split="val").load(data)
    # questions-file order; the annotation of 42002 (no such question) is not asked.
    assert [q.question_id for q in qs] == [42000, 42001, 73000]
    assert qs[0].text == f"How many folders are there?\n{SHORT}"
    assert qs[2].text == f"What color is the motorcycle?\n{SHORT}"
    val2014 = data / "vqav2" / "val2014"
    assert [q.images for q in qs] == [[val2014 / "COCO_val2014_000000000042.jpg"]] * 2 + [
        [val2014 / "COCO_val2014_000000000073.jpg"]]
    assert qs[2].truth == {"answers": ["red"] + ["black"] * 9}
    assert all(q.record == {} for q in qs)


def test_vqav2_val_score(tmp_path):
    qs = VQAv2(split="val").load(make_vqav2_val(tmp_path))
    # folders "Two." -> "2": humans "2", "2", "two" match (3 of 10) -> each of the 3 gets min(1, 2/3), each
    # of the other 7 min(1, 3/3): (2 + 7) / 10 = 0.9. door "Yes": 10 of 10 -> 1. motorcycle "Red": 1 of 10
    # -> (0 + 9 * 1/3) / 10 = 0.3. Mean (0.9 + 1 + 0.3) / 3.
    scores = VQAv2(split="val").score(qs, ["Two.", "Yes", "Red"], tmp_path / "out")
    assert scores == {"val_accuracy": pytest.approx(220 / 3)}
    assert _read(tmp_path / "out" / "vqav2_val2014_results.json") == [
        {"question_id": 42000, "answer": "2"}, {"question_id": 42001, "answer": "yes"},
        {"question_id": 73000, "answer": "red"}]
    assert not (tmp_path / "out" / "answers_upload").exists()
    # "3": 4 of 10 -> 1; "no": 0; "black": 9 of 10 -> 1. Mean 2/3.
    assert VQAv2(split="val").score(qs, ["3", "no", "black"], tmp_path / "o2") == {"val_accuracy": pytest.approx(200 / 3)}
    # The val metric must not be printed next to the published test-dev accuracy.
    assert not any("val_accuracy" in p for p in VQAv2.published.values())


def test_vqav2_val_question_without_annotation(tmp_path):
    data = make_vqav2_val(tmp_path)
    path = data / "vqav2" / "v2_mscoco_val2014_annotations.json"
    ann = _read(path)
    ann["annotations"] = [a for a in ann["annotations"] if a["question_id"] != 42001]
    path.write_text(json.dumps(ann))
    with pytest.raises(EvalDataError, match=re.escape(
            f"questions[1] (question_id 42001): no annotation with this question_id in {path}")) as e:
        VQAv2(split="val").load(data)
    assert e.value.path == str(data / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json")


def test_vqav2_val_bad_input(tmp_path):
    data = make_vqav2_val(tmp_path)
    root = data / "vqav2"
    questions, annotations = root / "v2_OpenEnded_mscoco_val2014_questions.json", root / "v2_mscoco_val2014_annotations.json"
    good_q, good_a = questions.read_text(), annotations.read_text()
    (root / "val2014" / "COCO_val2014_000000000073.jpg").unlink()
    with pytest.raises(EvalDataError, match=re.escape("image 'COCO_val2014_000000000073.jpg' not found")) as e:
        VQAv2(split="val").load(data)
    assert e.value.path == str(questions)
    make_vqav2_val(tmp_path)  # the image back
    doc = json.loads(good_q)
    doc["questions"].append(dict(doc["questions"][0]))
    questions.write_text(json.dumps(doc))
    with pytest.raises(EvalDataError, match=re.escape(
            "questions[3] (question_id 42000): duplicate question_id (first at questions[0])")):
        VQAv2(split="val").load(data)
    del doc["questions"][3]["image_id"]
    questions.write_text(json.dumps(doc))
    with pytest.raises(EvalDataError, match=re.escape("questions[3]: expected image_id (int), question (str)")):
        VQAv2(split="val").load(data)
    questions.write_text(json.dumps({"data": []}))
    with pytest.raises(EvalDataError, match=re.escape('expected {"questions": [...]}')):
        VQAv2(split="val").load(data)
    questions.write_text(good_q)
    doc = json.loads(good_a)
    doc["annotations"][2]["answers"] = []
    annotations.write_text(json.dumps(doc))
    with pytest.raises(EvalDataError, match=re.escape('annotations[2] (question_id 42001): expected "answers"')) as e:
        VQAv2(split="val").load(data)
    assert e.value.path == str(annotations)
    annotations.unlink()
    with pytest.raises(EvalDataError, match="v2_mscoco_val2014_annotations.json: file not found"):
        VQAv2(split="val").load(data)


# ----------------------------------------------------------------------------- GQA


def test_gqa_load_score_and_converted_file(tmp_path):
    data = make_gqa(tmp_path)
    qs = GQA().load(data)
    assert [q.question_id for q in qs] == ["201307251", "201640614", "202225914", "20968458"]
    assert qs[1].text == f"Who is wearing the dress?\n{SHORT}"
    assert qs[3].images == [data / "gqa" / "data" / "images" / "n161313.jpg"]
    # converted: "no", "the woman", "no", "blue" vs gold no, woman, no, blue -> 3 of 4 correct;
    # binary (verify: 1st, 3rd) 2/2; open (query: 2nd, 4th) 1/2.
    scores = GQA().score(qs, ["No.", "The woman", "no", "Blue"], tmp_path / "out")
    assert scores == {"accuracy": 75.0, "binary": 100.0, "open": 50.0}
    assert _read(tmp_path / "out" / "testdev_balanced_predictions.json") == [
        {"questionId": "201307251", "prediction": "no"}, {"questionId": "201640614", "prediction": "the woman"},
        {"questionId": "202225914", "prediction": "no"}, {"questionId": "20968458", "prediction": "blue"}]


def test_gqa_without_gold_file_writes_predictions_only(tmp_path, caplog):
    data = make_gqa(tmp_path)
    (data / "gqa" / "data" / "testdev_balanced_questions.json").unlink()
    qs = GQA().load(data)
    with caplog.at_level(logging.WARNING):
        assert GQA().score(qs, ["no"] * 4, tmp_path / "out") == {}
    assert "testdev_balanced_questions.json" in caplog.text and "no local score" in caplog.text
    assert len(_read(tmp_path / "out" / "testdev_balanced_predictions.json")) == 4


def test_gqa_partial_answers_are_reported(tmp_path, caplog):
    qs = GQA().load(make_gqa(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert GQA().score(qs[:2], ["no", "woman"], tmp_path / "out") == {"accuracy": 100.0, "binary": 100.0, "open": 100.0}
    assert "2 balanced questions" in caplog.text


def test_gqa_question_missing_from_gold(tmp_path):
    data = make_gqa(tmp_path)
    gold_path = data / "gqa" / "data" / "testdev_balanced_questions.json"
    gold = _read(gold_path)
    del gold["202225914"]
    gold_path.write_text(json.dumps(gold))
    with pytest.raises(EvalDataError, match="202225914") as e:
        GQA().load(data)
    assert e.value.line == 3 and e.value.path.endswith("llava_gqa_testdev_balanced.jsonl")


# ----------------------------------------------------------------------------- VizWiz


def test_vizwiz_load_and_upload(tmp_path, caplog):
    data = make_vizwiz(tmp_path)
    qs = VizWiz().load(data)
    assert [q.question_id for q in qs] == [0, 1, 2]
    assert qs[1].text == f"What is this?\n{VIZWIZ_HINT}\n{SHORT}"
    assert qs[2].images == [data / "vizwiz" / "test" / "VizWiz_test_00000002.jpg"]
    assert VizWiz().score(qs, ["A can of soup.", "Unanswerable", "No"], tmp_path / "out") == {}
    # "a can of soup." -> period deleted -> article "a" dropped.
    assert _read(tmp_path / "out" / "answers_upload" / "vizwiz_test.json") == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "can of soup"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_test_00000002.jpg", "answer": "no"}]
    with caplog.at_level(logging.WARNING):
        VizWiz().score(qs[:2], ["x", "y"], tmp_path / "out2")
    assert "only 2 of the 3 questions" in caplog.text


def test_vizwiz_splits():
    assert VizWiz.splits == ("test", "val")
    assert VizWiz().split == "test" and make_task("vizwiz").split == "test"
    assert make_task("vizwiz", split="val").split == "val"
    with pytest.raises(ValueError, match=r"no split 'test-dev'.*test, val"):
        VizWiz(split="test-dev")


def test_vizwiz_val_load(tmp_path):
    data = make_vizwiz_val(tmp_path)
    qs = VizWiz(split="val").load(data)
    names = [f"VizWiz_val_0000000{i}.jpg" for i in range(3)]
    assert [q.question_id for q in qs] == names  # the image names the question
    assert qs[1].text == f"What color is this shirt?\n{VIZWIZ_HINT}\n{SHORT}"
    assert [q.images for q in qs] == [[data / "vizwiz" / "val" / n] for n in names]
    assert qs[2].truth == {"image": names[2], "answers": ["no"] * 5 + ["yes"] * 5}


def test_vizwiz_val_score(tmp_path):
    qs = VizWiz(split="val").load(make_vizwiz_val(tmp_path))
    # soup "A can of soup." -> "can of soup" (period and article dropped): 4 of 10 -> 1. shirt
    # "Unanswerable": 2 of 10 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6. oven "Yes, it is." -> "yes it is": 0.
    scores = VizWiz(split="val").score(qs, ["A can of soup.", "Unanswerable", "Yes, it is."], tmp_path / "out")
    assert scores == {"val_accuracy": pytest.approx(160 / 3)}
    assert _read(tmp_path / "out" / "answers_upload" / "vizwiz_val.json") == [
        {"image": "VizWiz_val_00000000.jpg", "answer": "can of soup"},
        {"image": "VizWiz_val_00000001.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_val_00000002.jpg", "answer": "yes it is"}]
    # "soup": 3 of 10 -> 0.9; "blue": 8 -> 1; "no": 5 -> 1. Mean 2.9 / 3.
    assert VizWiz(split="val").score(qs, ["soup", "blue", "no"], tmp_path / "o2") == {"val_accuracy": pytest.approx(290 / 3)}
    assert not any("val_accuracy" in p for p in VizWiz.published.values())


def test_vizwiz_val_bad_input(tmp_path):
    data = make_vizwiz_val(tmp_path)
    path = data / "vizwiz" / "val.json"
    good = _read(path)
    (data / "vizwiz" / "val" / "VizWiz_val_00000001.jpg").unlink()
    with pytest.raises(EvalDataError, match=re.escape(
            f"image 'VizWiz_val_00000001.jpg' not found: expected the file {data / 'vizwiz' / 'val'}")) as e:
        VizWiz(split="val").load(data)
    assert e.value.path == str(path)
    make_vizwiz_val(tmp_path)  # the image back
    path.write_text(json.dumps(good + [good[0]]))
    with pytest.raises(EvalDataError, match=re.escape(
            "entry 3 (image 'VizWiz_val_00000000.jpg'): duplicate image (first at entry 0)")):
        VizWiz(split="val").load(data)
    del good[0]["answers"]
    path.write_text(json.dumps(good))
    with pytest.raises(EvalDataError, match=re.escape(
            "entry 0 (image 'VizWiz_val_00000000.jpg'): expected \"answers\": a non-empty list")):
        VizWiz(split="val").load(data)
    path.write_text(json.dumps({"annotations": good}))
    with pytest.raises(EvalDataError, match="val.json: expected a JSON list, got dict"):
        VizWiz(split="val").load(data)
    path.unlink()
    with pytest.raises(EvalDataError, match="val.json: file not found"):
        VizWiz(split="val").load(data)


# ----------------------------------------------------------------------------- TextVQA


def test_textvqa_load(tmp_path):
    data = make_textvqa(tmp_path)
    qs = TextVQA().load(data)
    # LLaVA's question_id is the image id; ours adds the question's rank on that image.
    assert [q.question_id for q in qs] == ["003a8ae2ef43b901#1", "831bcec304a17054#1", "831bcec304a17054#2",
                                          "97b1112b17015396#1"]
    assert [q.record for q in qs] == [{"question_id": "003a8ae2ef43b901"}, {"question_id": "831bcec304a17054"},
                                      {"question_id": "831bcec304a17054"}, {"question_id": "97b1112b17015396"}]
    assert qs[0].text == ("What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use, "
                          f"Camera, Pire, digitat\n{SHORT}")
    assert qs[3].text == f"Whats the lowest number yard line that you can see?\nReference OCR token: \n{SHORT}"
    assert qs[2].images == [data / "textvqa" / "train_images" / "831bcec304a17054.jpg"]
    assert len(qs[0].truth["answers"]) == 10


def test_textvqa_score(tmp_path):
    qs = TextVQA().load(make_textvqa(tmp_path))
    # camera "Dakota": 5 of 10 are "dakota" -> 1.0; liquor "Bowmore Islay": 3 -> 0.9;
    # aged "10 year": 1 -> 0.3; yard "Thirty": "thirty" is not mapped to 30, 2 -> 0.6. Mean 0.7.
    scores = TextVQA().score(qs, ["Dakota", "Bowmore Islay", "10 year", "Thirty"], tmp_path / "out")
    assert scores == {"accuracy": pytest.approx(70.0)}


def test_textvqa_without_annotations(tmp_path, caplog):
    data = make_textvqa(tmp_path)
    (data / "textvqa" / "TextVQA_0.5.1_val.json").unlink()
    with caplog.at_level(logging.WARNING):
        qs = TextVQA().load(data)
        assert TextVQA().score(qs, ["x"] * 4, tmp_path / "out") == {}
    assert "TextVQA_0.5.1_val.json" in caplog.text and "no local score" in caplog.text


def test_textvqa_question_without_annotation(tmp_path):
    data = make_textvqa(tmp_path)
    path = data / "textvqa" / "TextVQA_0.5.1_val.json"
    ann = _read(path)
    ann["data"] = [a for a in ann["data"] if a["question"] != "how long has the drink on the right been aged?"]
    path.write_text(json.dumps(ann))
    with pytest.raises(EvalDataError, match="no entry with image_id '831bcec304a17054'") as e:
        TextVQA().load(data)
    assert e.value.line == 3


def test_textvqa_prompt_shape_error_names_line(tmp_path):
    data = make_textvqa(tmp_path)
    path = data / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    row["text"] = "one line only"
    lines[1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalDataError, match="line") as e:
        TextVQA().load(data)
    assert e.value.line == 2


# ----------------------------------------------------------------------------- POPE


def test_pope_load(tmp_path):
    data = make_pope(tmp_path)
    qs = POPE().load(data)
    assert [q.question_id for q in qs] == [1, 2, 10000001, 10000002, 20000001, 20000002]
    assert qs[5].text == f"Is there a dining table in the image?\n{SHORT}"
    assert qs[1].images == [data / "pope" / "val2014" / "COCO_val2014_000000015738.jpg"]
    assert [q.truth for q in qs] == [
        {"split": "adversarial", "label": "yes"}, {"split": "adversarial", "label": "no"},
        {"split": "random", "label": "yes"}, {"split": "random", "label": "no"},
        {"split": "popular", "label": "yes"}, {"split": "popular", "label": "no"}]


def test_pope_score(tmp_path):
    qs = POPE().load(make_pope(tmp_path))
    answers = ["Yes", "No",                                          # adversarial: TP, TN
               "Yes, there is a snowboard.", "Yes, there is no car.",  # random: TP, TN ("no" in the sentence)
               "There is a person.", "NO"]                           # popular: TP, FP ("NO" is not a no)
    s = POPE().score(qs, answers, tmp_path / "out")
    for split in ("adversarial", "random"):
        assert {k: s[f"{split}_{k}"] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} == {
            "accuracy": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0, "yes_ratio": 50.0}
    # popular: precision 1/2, recall 1/1, F1 2*0.5*1/1.5 = 2/3.
    assert s["popular_accuracy"] == 50.0 and s["popular_precision"] == 50.0 and s["popular_recall"] == 100.0
    assert s["popular_f1"] == pytest.approx(200 / 3) and s["popular_yes_ratio"] == 100.0
    assert s["f1"] == pytest.approx((100 + 100 + 200 / 3) / 3)
    assert s["accuracy"] == pytest.approx(250 / 3) and s["precision"] == pytest.approx(250 / 3)
    assert s["recall"] == 100.0 and s["yes_ratio"] == pytest.approx(200 / 3)
    assert len(s) == 20


def test_pope_missing_split_labels_are_reported(tmp_path, caplog):
    data = make_pope(tmp_path)
    (data / "pope" / "coco" / "coco_pope_popular.json").unlink()
    with caplog.at_level(logging.WARNING):
        qs = POPE().load(data)
        s = POPE().score(qs, ["Yes", "No", "Yes", "No", "Yes", "Yes"], tmp_path / "out")
    assert "coco_pope_popular.json" in caplog.text and "popular" in caplog.text
    assert not any(k.startswith("popular") for k in s) and s["f1"] == 100.0


def test_pope_shifted_labels(tmp_path):
    data = make_pope(tmp_path)
    path = data / "pope" / "coco" / "coco_pope_random.json"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[::-1]) + "\n")
    with pytest.raises(EvalDataError, match="expected the label of") as e:
        POPE().load(data)
    assert e.value.line == 1 and e.value.path.endswith("coco_pope_random.json")
    # The error says which label release LLaVA's questions (and published numbers) go with.
    assert "POPE's repository at commit e3e3926" in str(e.value) and "/output/coco" in str(e.value)


def test_pope_label_count(tmp_path):
    data = make_pope(tmp_path)
    path = data / "pope" / "coco" / "coco_pope_adversarial.json"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    with pytest.raises(EvalDataError, match=r"expected one label per 'adversarial' question .*\(2\), found 1 lines; "
                                            r"use the labels of POPE's repository at commit e3e3926"):
        POPE().load(data)


# ----------------------------------------------------------------------------- ScienceQA


def test_scienceqa_load(tmp_path):
    data = make_scienceqa(tmp_path)
    qs = ScienceQA().load(data)
    assert [q.question_id for q in qs] == ["4", "5", "11", "15"]
    text4 = ("Context: Sing, O goddess, the anger of Achilles son of Peleus.\n\u2014Homer, The Iliad\n"
             f"Which figure of speech is used in this text?\nA. chiasmus\nB. apostrophe\n{SQA_HINT}")
    assert qs[0].text == text4 and qs[0].images == [] and qs[0].record == {"prompt": text4}
    text5 = ("Context: Gordon tested a parachute in a wind tunnel.\nWhich of the following could Gordon's test show?\n"
             "A. if the spacecraft was damaged\nB. how steady a parachute was\nC. whether it would swing\n" + SQA_HINT)
    assert qs[1].text == text5 and qs[1].record == {"prompt": "<image>\n" + text5}
    assert qs[1].images == [data / "scienceqa" / "images" / "test" / "5" / "image.png"]


def test_scienceqa_score_and_files(tmp_path):
    qs = ScienceQA().load(make_scienceqa(tmp_path))
    # "4": B = answer B; "5" (image): sentence rule -> B = answer; "11" (image): "D." is too short -> FAILED;
    # "15": "A. ..." -> A = answer. All: 3/4; image problems 5 and 11: 1/2.
    answers = ["B", "The answer is B.", "D.", "A. 7 kilograms"]
    assert ScienceQA().score(qs, answers, tmp_path / "out") == {"accuracy": 75.0, "img_accuracy": 50.0}
    result = _read(tmp_path / "out" / "scienceqa_result.json")
    assert result["acc"] == 75.0 and result["correct"] == 3 and result["count"] == 4
    assert result["results"] == {"4": 1, "5": 1, "11": -1, "15": 0}
    assert result["outputs"] == dict(zip(["4", "5", "11", "15"], answers))
    output = _read(tmp_path / "out" / "scienceqa_output.json")
    assert [r["question_id"] for r in output["correct"]] == ["4", "5", "15"]
    (wrong,) = output["incorrect"]
    assert wrong["question_id"] == "11" and wrong["parsed_ans"] == "FAILED" and wrong["ground_truth"] == "D"
    assert wrong["is_multimodal"] is True and wrong["question"].startswith("<image>\nContext: Lynx")


def test_scienceqa_unanswered_problems_count_as_failed_text_problems(tmp_path):
    qs = ScienceQA().load(make_scienceqa(tmp_path))
    # Only "4" and "5" answered (both right); "11" and "15" are FAILED with prompt "Unknown", so "11" no
    # longer counts as an image problem: all 2/4, image 1/1 -- eval_science_qa.py's arithmetic.
    assert ScienceQA().score(qs[:2], ["B", "B"], tmp_path / "out") == {"accuracy": 50.0, "img_accuracy": 100.0}


def test_scienceqa_question_outside_the_split_is_not_scored(tmp_path, caplog):
    data = make_scienceqa(tmp_path)
    splits_path = data / "scienceqa" / "pid_splits.json"
    splits = _read(splits_path)
    splits["test"] = ["4", "5", "11"]
    splits_path.write_text(json.dumps(splits))
    qs = ScienceQA().load(data)
    assert len(qs) == 4
    # "15" is answered but not in the split: 4 right, 5 right, 11 FAILED -> 2/3; image 5 and 11 -> 1/2.
    with caplog.at_level(logging.WARNING):
        scores = ScienceQA().score(qs, ["B", "The answer is B.", "D.", "A. 7 kilograms"], tmp_path / "out")
    assert scores == {"accuracy": pytest.approx(200 / 3), "img_accuracy": 50.0}
    assert "1 answered questions are not in the 'test' split" in caplog.text


def test_scienceqa_without_answer_key(tmp_path, caplog):
    data = make_scienceqa(tmp_path)
    (data / "scienceqa" / "problems.json").unlink()
    with caplog.at_level(logging.WARNING):
        qs = ScienceQA().load(data)
        assert ScienceQA().score(qs, ["A"] * 4, tmp_path / "out") == {}
    assert "problems.json" in caplog.text and "no local score" in caplog.text


def _sqa_file(data: Path) -> Path:
    return data / "scienceqa" / "llava_test_CQM-A.json"


def test_scienceqa_bad_inputs(tmp_path):
    data = make_scienceqa(tmp_path)
    path = _sqa_file(data)
    good = path.read_text()
    path.write_text(good.replace('"id": "5"', '"id": "4"'))
    with pytest.raises(EvalDataError, match=r"entry 1 \(id '4'\): duplicate id '4' \(first at entry 0\)"):
        ScienceQA().load(data)
    path.write_text(good.replace('"conversations"', '"turns"', 1))
    with pytest.raises(EvalDataError, match="entry 0 .*expected"):
        ScienceQA().load(data)
    path.write_text(good[:-3])  # cut the closing brackets
    with pytest.raises(EvalDataError, match="expected a JSON document") as e:
        ScienceQA().load(data)
    assert e.value.line is not None and e.value.line > 1
    path.write_text(good)
    (data / "scienceqa" / "images" / "test" / "11" / "image.png").unlink()
    with pytest.raises(EvalDataError, match=r"entry 2 \(id '11'\): image '11/image.png' not found"):
        ScienceQA().load(data)
    path.unlink()
    with pytest.raises(EvalDataError, match="llava_test_CQM-A.json: file not found"):
        ScienceQA().load(data)


# ----------------------------------------------------------------------------- bad jsonl input, every task

JSONL_TASKS = [
    (make_vqav2, VQAv2, "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl"),
    (make_gqa, GQA, "gqa/llava_gqa_testdev_balanced.jsonl"),
    (make_vizwiz, VizWiz, "vizwiz/llava_test.jsonl"),
    (make_textvqa, TextVQA, "textvqa/llava_textvqa_val_v051_ocr.jsonl"),
    (make_pope, POPE, "pope/llava_pope_test.jsonl"),
]
IDS = [t[1].name for t in JSONL_TASKS]


@pytest.mark.parametrize("make, task, rel", JSONL_TASKS, ids=IDS)
def test_malformed_line(tmp_path, make, task, rel):
    data = make(tmp_path)
    path = data / rel
    n = len(path.read_text().splitlines())
    with open(path, "a") as f:
        f.write('{"question_id": 7, "image": \n')
    with pytest.raises(EvalDataError, match=r"expected a JSON object per line \(LLaVA question file\)") as e:
        task().load(data)
    assert e.value.path == str(path) and e.value.line == n + 1


@pytest.mark.parametrize("make, task, rel", JSONL_TASKS, ids=IDS)
def test_duplicate_question(tmp_path, make, task, rel):
    data = make(tmp_path)
    path = data / rel
    lines = path.read_text().splitlines()
    with open(path, "a") as f:
        f.write(lines[0] + "\n")
    with pytest.raises(EvalDataError, match=r"duplicate question .*\(first on line 1\)") as e:
        task().load(data)
    assert e.value.path == str(path) and e.value.line == len(lines) + 1


@pytest.mark.parametrize("make, task, rel", JSONL_TASKS, ids=IDS)
def test_missing_image(tmp_path, make, task, rel):
    data = make(tmp_path)
    path = data / rel
    first = json.loads(path.read_text().splitlines()[0])
    image = next(p for p in (data / rel.split("/")[0]).rglob(first["image"]))
    image.unlink()
    with pytest.raises(EvalDataError, match=re.escape(f"image '{first['image']}' not found: expected the file {image}")) as e:
        task().load(data)
    assert e.value.path == str(path) and e.value.line == 1


@pytest.mark.parametrize("make, task, rel", JSONL_TASKS, ids=IDS)
def test_missing_field(tmp_path, make, task, rel):
    data = make(tmp_path)
    path = data / rel
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    del row["image"]
    lines[1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalDataError, match="expected keys question_id, image, text; missing image") as e:
        task().load(data)
    assert e.value.line == 2


@pytest.mark.parametrize("make, task, rel", JSONL_TASKS, ids=IDS)
def test_missing_question_file(tmp_path, make, task, rel):
    data = make(tmp_path)
    (data / rel).unlink()
    with pytest.raises(EvalDataError, match=r"file not found \(expected LLaVA question file\)") as e:
        task().load(data)
    assert e.value.path == str(data / rel) and e.value.line is None
