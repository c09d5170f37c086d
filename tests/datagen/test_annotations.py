"""Annotations, prompt folders and answer parsing of fastllava.datagen, without a server."""

import json

import pytest

from fastllava.datagen.annotations import load_annotations, normalize_coco_box
from fastllava.datagen.messages import (
    BRIEF_INSTRUCTIONS,
    DETAIL_INSTRUCTIONS,
    KINDS,
    default_prompt_dir,
    detail_instruction,
    load_prompt,
)
from fastllava.datagen.run import brief_record
from fastllava.datagen.validate import Invalid, to_conversations


def test_coco_folder_merges_captions_and_normalized_boxes(tmp_path, write_coco):
    contexts = load_annotations([str(write_coco(tmp_path, 2))])
    assert [c.id for c in contexts] == ["100", "101"]
    assert contexts[0].image == "000000000100.jpg"
    assert contexts[0].captions == ["cat 0 resting", "A cat 0 on a sofa."]
    # [64, 48, 320, 240] px in 640x480 -> x1 = 64/640, y1 = 48/480, x2 = 384/640, y2 = 288/480
    assert contexts[0].boxes[0].bbox == (0.1, 0.1, 0.6, 0.6)
    assert contexts[0].text() == "cat 0 resting\nA cat 0 on a sofa.\n\ncat: [0.1, 0.1, 0.6, 0.6]"


def test_coco_images_without_captions_are_kept_for_the_run_to_count(tmp_path, write_coco):
    write_coco(tmp_path, 2)
    data = json.loads((tmp_path / "instances_tiny.json").read_text())
    data["images"].append({"id": 7, "file_name": "7.jpg", "width": 10, "height": 10})
    (tmp_path / "instances_tiny.json").write_text(json.dumps(data))
    contexts = load_annotations([str(tmp_path)])
    assert [(c.id, len(c.captions)) for c in contexts] == [("7", 0), ("100", 2), ("101", 2)]
    data["annotations"].append({"id": 5, "image_id": 8, "category_id": 17, "bbox": [1, 1, 2, 2]})
    (tmp_path / "instances_tiny.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="annotations for image id 8 but no file lists that image"):
        load_annotations([str(tmp_path)])


def test_box_normalization_rounds_to_3_decimals_and_clamps():
    assert normalize_coco_box([10, 20, 100, 1000], 333, 500) == (0.03, 0.04, 0.33, 1.0)
    assert normalize_coco_box([1, 1, 1, 1], 3, 7) == (0.333, 0.143, 0.667, 0.286)


def test_jsonl_input(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text(json.dumps({"image": "a.jpg", "captions": ["A dog."], "boxes": [
        {"category": "dog", "bbox": [0.1, 0.2, 0.5, 0.9]}]}) + "\n\n"
        + json.dumps({"id": 7, "image": "b.jpg", "captions": ["A bird."]}) + "\n")
    a, b = load_annotations([str(path)])
    assert (a.id, a.text()) == ("a.jpg", "A dog.\n\ndog: [0.1, 0.2, 0.5, 0.9]")
    assert (b.id, b.image, b.boxes) == ("7", "b.jpg", [])


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.jpg", "captions": []}', "line 2: 'captions'"),
    ('{"captions": ["x"]}', "line 2: each record needs an 'image'"),
    ('{"image": "a.jpg", "captions": ["x"], "boxes": [{"category": "d", "bbox": [10, 20, 30, 40]}]}', "line 2: box 0"),
    ('{"image": "a.jpg", ', "line 2: malformed JSON"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "ann.jsonl"
    path.write_text('{"image": "ok.jpg", "captions": ["fine"]}\n' + line + "\n")
    with pytest.raises(ValueError, match=str(path).replace(".", r"\.") + ".*" + message.replace("[", r"\[")):
        load_annotations([str(path)])


def test_bad_coco_names_file_and_record(tmp_path, write_coco):
    write_coco(tmp_path, 2)
    data = json.loads((tmp_path / "instances_tiny.json").read_text())
    data["annotations"][1]["bbox"] = [1, 2, 3]
    (tmp_path / "instances_tiny.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_tiny\.json: annotation 1: bbox must be 4 numbers"):
        load_annotations([str(tmp_path)])
    with pytest.raises(ValueError, match="do not exist"):
        load_annotations([str(tmp_path / "missing.json")])


@pytest.mark.parametrize("kind", KINDS)
def test_default_prompts_load_and_their_examples_parse(kind):
    prompt = load_prompt(default_prompt_dir(kind))
    assert prompt.system and prompt.examples
    messages = prompt.messages("A cat.")
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(prompt.examples) + ["user"]
    assert messages[-1]["content"] == "A cat."
    for _, answer in prompt.examples:  # our own examples must be answers our parser accepts
        turns = to_conversations(kind, "1", answer)
        assert turns[0]["value"].startswith("<image>\n")


def test_prompt_folder_in_llava_layout(tmp_path):
    (tmp_path / "system_message.txt").write_text("sys\n")
    (tmp_path / "000_caps.txt").write_text("caps0")
    (tmp_path / "000_conv.txt").write_text("conv0")
    (tmp_path / "001_conv.txt").write_text("no caps: ignored")
    assert load_prompt(str(tmp_path)).examples == (("caps0", "conv0"),)
    (tmp_path / "system_message.txt").unlink()
    with pytest.raises(ValueError, match="no system_message.txt"):
        load_prompt(str(tmp_path))


def test_conversation_parsing():
    answer = "Question: What is it?\n===\nAnswer:\nA dog.\n===\nQuestion:\nWhere?\n ===\nAnswer: On grass."
    assert to_conversations("conversation", "1", answer) == [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "On grass."}]


def test_json_lines_answers_as_llava_older_conversation_prompts_ask():
    answer = ('{"question": "What is it?", "answer": "A dog."}\n\n'
              '{"question": "Where?", "answer": " On grass. "}\n')
    assert to_conversations("conversation", "1", answer) == to_conversations(
        "conversation", "1", "Question: What is it?\n===\nAnswer:\nA dog.\n===\nQuestion:\nWhere?\n===\nAnswer: On grass.")


@pytest.mark.parametrize("kind, answer, reason", [
    ("conversation", '{"question": "What?", "answer": "A dog."}\n{"question": "Why?"', "format"),
    ("conversation", '{"question": "What?", "reply": "A dog."}', "format"),
    ("conversation", '{"question": "What?", "answer": ""}', "empty_turn"),
    ("reasoning", '{"question": "A?", "answer": "B."}\n{"question": "C?", "answer": "D."}', "roles"),
    ("conversation", "", "empty"),
    ("conversation", None, "empty"),
    ("conversation", "A dog on the grass.", "format"),
    ("conversation", "Question:\nWhat?\n===\nQuestion:\nWhy?", "roles"),
    ("conversation", "Question:\nWhat?\n===\nAnswer:\nA dog.\n===\nQuestion:\nWhy?", "roles"),
    ("conversation", "Question:\nWhat?\n===\nAnswer:\n\n===", "empty_turn"),
    ("conversation", "Question:\nWhere?\n===\nAnswer:\nThe dog at [0.12, 0.3, 0.5, 0.9].", "coordinates"),
    ("reasoning", "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?\n===\nAnswer:\nD.", "roles"),
    ("detail", "A dog sits at [0.1, 0.2, 0.3, 0.4] in the picture.", "coordinates"),
    ("detail", "Question:\nWhat?", "format"),
])
def test_bad_answers_are_invalid_with_a_reason(kind, answer, reason):
    with pytest.raises(Invalid) as e:
        to_conversations(kind, "1", answer)
    assert e.value.reason == reason


def test_detail_question_is_deterministic_per_image_and_varies():
    assert detail_instruction("42") == detail_instruction("42")
    assert len({detail_instruction(str(i)) for i in range(200)}) == len(DETAIL_INSTRUCTIONS)
    turns = to_conversations("detail", "42", " A dog on grass. ")
    assert turns == [{"from": "human", "value": "<image>\n" + detail_instruction("42")},
                     {"from": "gpt", "value": "A dog on grass."}]


def test_brief_sample_is_a_drawn_instruction_answered_by_one_of_the_captions(tmp_path, write_coco):
    from fastllava.datagen.annotations import ImageContext

    captions = ["A cat.", "A cat on a sofa.", "An orange cat resting."]
    records = [brief_record(ImageContext(str(i), f"{i}.jpg", captions), "coco/") for i in range(300)]
    assert records[5] == brief_record(ImageContext("5", "5.jpg", captions), "coco/")  # deterministic
    questions = [r["conversations"][0]["value"] for r in records]
    answers = [r["conversations"][1]["value"] for r in records]
    assert all(q.startswith("<image>\n") for q in questions) and records[0]["image"] == "coco/0.jpg"
    assert {q.removeprefix("<image>\n") for q in questions} == set(BRIEF_INSTRUCTIONS)  # every one used
    assert set(answers) == set(captions)
    # the instruction does not decide the caption: every pair occurs
    assert len(set(zip(questions, answers))) == len(BRIEF_INSTRUCTIONS) * len(captions)
