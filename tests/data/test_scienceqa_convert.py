"""fastllava.data.scienceqa against LLaVA's scripts/convert_sqa_to_llava.py: the expected strings below were
worked out by hand from LLaVA's create_one_example_chatbot and convert_to_llava (not re-derived with our
builder), for hand-written ScienceQA-shaped problems; the CQM-A file against an excerpt of LLaVA-1.5's own
llava_test_CQM-A.json; then the malformed problems, the CLI and the files the `scienceqa` eval task reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from fastllava.data.scienceqa import build_example, main
from fastllava.eval.tasks.scienceqa import SINGLE_PRED_PROMPT, ScienceQA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from layout_vqa import make_scienceqa  # noqa: E402

LECTURE = "Properties are what you can observe.\nA property tells how a thing looks."
IMAGE_PROBLEM = {  # an image problem with a hint, a two-line lecture and a solution
    "question": "Which property do these two objects have in common?", "choices": ["hard", "soft"], "answer": 1,
    "hint": "Select the better answer.", "image": "image.png", "lecture": LECTURE,
    "solution": "Both objects are soft.", "subject": "natural science", "grade": "grade2", "split": "train"}
TEXT_PROBLEM = {  # no hint, no lecture, a double space, a literal backslash-n in the solution
    "question": "Which word  comes first?", "choices": ["apple", "zoo", "moon"], "answer": 0, "hint": "",
    "image": None, "lecture": "", "solution": "Apple comes first.\\nIn ABC order.", "subject": "language science",
    "grade": "grade9", "split": "test"}

# LLaVA's human turns (its "\n<image>" suffix aside: see test_image_tag_in_front).
IMAGE_QCM = ("Which property do these two objects have in common?\nContext: Select the better answer.\n"
             "Options: (A) hard (B) soft")
TEXT_QCM = "Which word comes first?\nContext: N/A\nOptions: (A) apple (B) zoo (C) moon"


@pytest.mark.parametrize("problem, fmt, human, gpt", [
    (IMAGE_PROBLEM, "QCM-A", IMAGE_QCM, "The answer is B."),
    (IMAGE_PROBLEM, "QCM-LEA", IMAGE_QCM,
     "Properties are what you can observe.\nA property tells how a thing looks. Both objects are soft. The answer is B."),
    (IMAGE_PROBLEM, "QCM-LEPA", IMAGE_QCM,
     "LECTURE: Properties are what you can observe.\nA property tells how a thing looks.\n"
     "SOLUTION: Both objects are soft.\n###\nANSWER: B."),
    (IMAGE_PROBLEM, "CQM-A",
     "Context: Select the better answer.\nQuestion: Which property do these two objects have in common?\n"
     "Options: (A) hard (B) soft", "The answer is B."),
    # LLaVA's letters are swapped: AL appends the solution, AE the lecture.
    (IMAGE_PROBLEM, "QCM-AL", IMAGE_QCM, "The answer is B. BECAUSE: Both objects are soft."),
    (IMAGE_PROBLEM, "QCM-AE", IMAGE_QCM,
     "The answer is B. BECAUSE: Properties are what you can observe.\nA property tells how a thing looks."),
    (IMAGE_PROBLEM, "QCLM-EA",
     "Which property do these two objects have in common?\nContext: Select the better answer.\n"
     "BECAUSE: Properties are what you can observe.\nA property tells how a thing looks.\nOptions: (A) hard (B) soft",
     "Both objects are soft. The answer is B."),
    (TEXT_PROBLEM, "QCM-A", TEXT_QCM, "The answer is A."),
    # An empty lecture leaves "Answer:  Apple" whose double space becomes one; "\\n" becomes a newline.
    (TEXT_PROBLEM, "QCM-LEA", TEXT_QCM, "Apple comes first.\nIn ABC order. The answer is A."),
    (TEXT_PROBLEM, "QCM-LEPA", TEXT_QCM, "SOLUTION: Apple comes first.\nIn ABC order.\n###\nANSWER: A."),
    # CQM does not start with "Question: ", which therefore stays.
    (TEXT_PROBLEM, "CQM-A", "Context: N/A\nQuestion: Which word comes first?\nOptions: (A) apple (B) zoo (C) moon",
     "The answer is A."),
    # QCML with an empty lecture ends in "BECAUSE:", which is dropped; AE likewise.
    (TEXT_PROBLEM, "QCML-AE", TEXT_QCM, "The answer is A."),
])
def test_prompt_formats_match_llava(problem, fmt, human, gpt):
    assert build_example(problem, fmt) == (human, gpt)


def test_unknown_format():
    for fmt in ("QCM", "QMC-A", "QCM-XYZ", "QCM-A-B"):
        with pytest.raises(ValueError, match="expected INPUT-OUTPUT with INPUT one of CQM, QCM"):
            build_example(IMAGE_PROBLEM, fmt)


def _release(tmp_path, problems, splits, images=("1",)):
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps(splits))
    for pid in images:
        folder = tmp_path / "images" / problems[pid]["split"] / pid
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 6), (10, 200, 30)).save(folder / "image.png")
    (tmp_path / "images").mkdir(exist_ok=True)
    return ["--problems", str(tmp_path / "problems.json"), "--splits", str(tmp_path / "pid_splits.json"),
            "--images", str(tmp_path / "images"), "--no-progress"]


def test_image_tag_in_front(tmp_path):
    args = _release(tmp_path, {"1": IMAGE_PROBLEM, "2": TEXT_PROBLEM}, {"train": ["1", "2"]})
    assert main(args + ["--format", "QCM-LEPA", "--out", str(tmp_path / "out")]) == 0
    entries = json.loads((tmp_path / "out" / "llava_train_QCM-LEPA.json").read_text())
    assert entries[0]["id"] == "1" and entries[0]["image"] == "1/image.png"
    human = entries[0]["conversations"][0]
    # LLaVA writes IMAGE_QCM + "\n<image>"; its preprocess_multimodal and model_vqa_science.py both strip the
    # tag and put "<image>\n" in front, which is what is written here.
    assert human == {"from": "human", "value": "<image>\n" + IMAGE_QCM}
    assert entries[1] == {"id": "2", "conversations": [
        {"from": "human", "value": TEXT_QCM},
        {"from": "gpt", "value": "SOLUTION: Apple comes first.\nIn ABC order.\n###\nANSWER: A."}]}


def test_malformed_problems_are_named_counted_and_listed(tmp_path, capsys, caplog):
    bad = {
        "10": {k: v for k, v in TEXT_PROBLEM.items() if k != "lecture"},
        "11": {**TEXT_PROBLEM, "choices": ["x", "y"], "answer": 3},
        "12": {**IMAGE_PROBLEM, "split": "train"},  # its image file is not written
        "14": {**TEXT_PROBLEM, "choices": list("abcdef")},
        "15": {**TEXT_PROBLEM, "answer": True},
        "16": "not a problem",
    }
    problems = {"1": IMAGE_PROBLEM, "2": TEXT_PROBLEM, **bad}
    splits = {"train": ["1", "10", "12", "13"], "test": ["2", "11", "14", "15", "16"]}
    args = _release(tmp_path, problems, splits)
    out = tmp_path / "out"
    assert main(args + ["--format", "QCM-A", "--out", str(out)]) == 0
    skipped = json.loads((out / "scienceqa_skipped.json").read_text())
    reasons = {s["pid"]: (s["split"], s["reason"]) for s in skipped}
    assert reasons == {
        "10": ("train", "missing field 'lecture'"),
        "12": ("train", f"image 'image.png' not found: expected the file {tmp_path / 'images' / 'train' / '12' / 'image.png'}"),
        "13": ("train", "listed in pid_splits.json but not in problems.json"),
        "11": ("test", "answer index 3 out of range for 2 choices"),
        "14": ("test", "6 choices: expected 2 to 5 (letters A-E)"),
        "15": ("test", "field 'answer': expected a choice index (int), got True"),
        "16": ("test", "expected an object, got str"),
    }
    assert [e["id"] for e in json.loads((out / "llava_train_QCM-A.json").read_text())] == ["1"]
    assert [e["id"] for e in json.loads((out / "llava_test_QCM-A.json").read_text())] == ["2"]
    assert "skipped 7" in capsys.readouterr().out
    assert "skipped problem 13 (split train): listed in pid_splits.json but not in problems.json" in caplog.text


def test_nothing_converted_exits_1(tmp_path, capsys):
    args = _release(tmp_path, {"1": IMAGE_PROBLEM, "2": {**TEXT_PROBLEM, "answer": 7}}, {"train": ["2", "9"]})
    assert main(args + ["--out", str(tmp_path / "out")]) == 1
    assert "no problem converted" in capsys.readouterr().err


def test_bad_arguments_exit_2(tmp_path, capsys):
    args = _release(tmp_path, {"1": IMAGE_PROBLEM}, {"train": ["1"]})
    with pytest.raises(SystemExit) as e:
        main(args + ["--format", "QCM-LEX", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--format: prompt format 'QCM-LEX'" in capsys.readouterr().err
    assert main(args + ["--split", "nope", "--out", str(tmp_path / "out")]) == 2
    assert "split 'nope' is not in" in capsys.readouterr().err
    (tmp_path / "pid_splits.json").write_text("{")
    assert main(args + ["--out", str(tmp_path / "out")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "Exit status" in capsys.readouterr().out


def test_test_split_gives_the_eval_layout(tmp_path):
    test_image = {**IMAGE_PROBLEM, "split": "test"}
    args = _release(tmp_path, {"1": test_image, "2": TEXT_PROBLEM, "3": IMAGE_PROBLEM},
                    {"train": ["3"], "test": ["1", "2"]}, images=("1", "3"))
    out = tmp_path / "eval" / "scienceqa"
    assert main(args + ["--format", "QCM-LEA", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "images", "llava_test_CQM-A.json", "llava_test_QCM-LEA.json", "llava_train_QCM-LEA.json", "pid_splits.json",
        "problems.json", "scienceqa_skipped.json"]
    questions = ScienceQA().load(tmp_path / "eval")
    assert [q.question_id for q in questions] == ["1", "2"]
    cqm = "Context: Select the better answer.\nWhich property do these two objects have in common?\nA. hard\nB. soft"
    assert questions[0].text == cqm + "\n" + SINGLE_PRED_PROMPT and questions[0].record["prompt"].startswith("<image>\n")
    assert questions[0].images == [out / "images" / "test" / "1" / "image.png"] and questions[0].images[0].is_file()
    paper = ScienceQA(question_format="QCM-LEA").load(tmp_path / "eval")
    assert paper[1].text == TEXT_QCM and paper[1].images == []
    assert ScienceQA().score(questions, ["B", "The answer is A."], tmp_path / "scores") == {
        "accuracy": 100.0, "img_accuracy": 100.0}


# ScienceQA's test problems 4, 11, 26, 46 and 332 (question, choices, answer, hint, image of problems.json, read
# from the copy in github.com/Think-ScienceQA/Think-ScienceQA.github.io data/scienceqa/; no lecture or
# solution, which CQM-A does not show)...
RELEASE = {
    "4": ("Which figure of speech is used in this text?\nSing, O goddess, the anger of Achilles son of Peleus, that "
          "brought countless ills upon the Achaeans.\n\u2014Homer, The Iliad", ["chiasmus", "apostrophe"], 1, "", None),
    "11": ("What is the name of the colony shown?", ["Maryland", "New Hampshire", "Rhode Island", "Vermont"], 1, "",
           "image.png"),
    "26": ("How long does it take to bake lasagna in the oven?", ["33 minutes", "33 hours"], 0,
           "Select the better estimate.", None),
    "46": ("Which property do these three objects have in common?", ["shiny", "slippery", "opaque"], 2,
           "Select the best answer.", "image.png"),
    "332": ("Which animal is also adapted to be camouflaged in the snow?", ["short-tailed weasel", "common hawk-cuckoo"],
            0, "Arctic wolves live in the Canadian Arctic and Greenland. The  is adapted to be camouflaged in the snow."
            "\nFigure: Arctic wolf.", "image.png"),
}
# ... and their entries in LLaVA-1.5's llava_test_CQM-A.json (eval.zip; copied byte for byte from the copy at
# github.com/haotian-liu/LLaVA commit 32cebc3, playground/data/eval/scienceqa/, a fork's commit): a text problem
# without and with a hint (the hint leads as "Context: ", as for an image problem), an image problem without
# and with one, and a hint whose double space became one.
LLAVA15_CQM_A = r"""[
  {
    "id": "4",
    "conversations": [
      {
        "from": "human",
        "value": "Which figure of speech is used in this text?\nSing, O goddess, the anger of Achilles son of Peleus, that brought countless ills upon the Achaeans.\n\u2014Homer, The Iliad\nA. chiasmus\nB. apostrophe"
      },
      {
        "from": "gpt",
        "value": "B"
      }
    ]
  },
  {
    "id": "11",
    "image": "11/image.png",
    "conversations": [
      {
        "from": "human",
        "value": "<image>\nWhat is the name of the colony shown?\nA. Maryland\nB. New Hampshire\nC. Rhode Island\nD. Vermont"
      },
      {
        "from": "gpt",
        "value": "B"
      }
    ]
  },
  {
    "id": "26",
    "conversations": [
      {
        "from": "human",
        "value": "Context: Select the better estimate.\nHow long does it take to bake lasagna in the oven?\nA. 33 minutes\nB. 33 hours"
      },
      {
        "from": "gpt",
        "value": "A"
      }
    ]
  },
  {
    "id": "46",
    "image": "46/image.png",
    "conversations": [
      {
        "from": "human",
        "value": "<image>\nContext: Select the best answer.\nWhich property do these three objects have in common?\nA. shiny\nB. slippery\nC. opaque"
      },
      {
        "from": "gpt",
        "value": "C"
      }
    ]
  },
  {
    "id": "332",
    "image": "332/image.png",
    "conversations": [
      {
        "from": "human",
        "value": "<image>\nContext: Arctic wolves live in the Canadian Arctic and Greenland. The is adapted to be camouflaged in the snow.\nFigure: Arctic wolf.\nWhich animal is also adapted to be camouflaged in the snow?\nA. short-tailed weasel\nB. common hawk-cuckoo"
      },
      {
        "from": "gpt",
        "value": "A"
      }
    ]
  }
]"""


def test_cqm_a_file_is_llava15s(tmp_path):
    problems = {pid: {"question": q, "choices": c, "answer": a, "hint": h, "image": image, "lecture": "",
                      "solution": "", "split": "test"} for pid, (q, c, a, h, image) in RELEASE.items()}
    args = _release(tmp_path, problems, {"test": list(RELEASE)}, images=("11", "46", "332"))
    # CQM-A asked for (it is also written unasked for the test split) names the same file, the same layout.
    assert main(args + ["--format", "QCM-LEA", "CQM-A", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "llava_test_CQM-A.json").read_bytes() == LLAVA15_CQM_A.encode()


def test_eval_task_asks_what_it_asks_from_llava15s_file(tmp_path):
    """The `scienceqa` task on the converter's output of make_scienceqa's release asks the questions it asks
    from that layout's stand-in for LLaVA-1.5's file."""
    fake = make_scienceqa(tmp_path / "fake") / "scienceqa"
    out = tmp_path / "ours" / "scienceqa"
    assert main(["--problems", str(fake / "problems.json"), "--splits", str(fake / "pid_splits.json"), "--images",
                 str(fake / "images"), "--split", "test", "--out", str(out), "--no-progress"]) == 0
    theirs, ours = ScienceQA().load(fake.parent), ScienceQA().load(out.parent)
    assert [q.question_id for q in ours] == [q.question_id for q in theirs] == ["4", "5", "11", "15"]
    for q, t in zip(ours, theirs):
        assert (q.text, q.record) == (t.text, t.record)
        assert [i.relative_to(out) for i in q.images] == [i.relative_to(fake) for i in t.images]
