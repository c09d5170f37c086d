"""Tiny evaluation data directories in LLaVA's layout, for VQAv2, GQA, VizWiz, TextVQA, POPE and ScienceQA.

Each `make_<task>(root)` writes `root/playground/data/eval/<task folder>/...` as LLaVA's docs/Evaluation.md
lays it out -- question files in the format LLaVA's eval.zip ships them (the question texts and ids below
are modeled on the real files), small real images written with PIL, and the answer/annotation files
where a local score exists -- and returns `root/playground/data/eval`, the directory to pass as --data.
`make_vqav2_val` and `make_vizwiz_val` write the datasets' official val files instead (the `--split val`
layouts), into the same vqav2/ and vizwiz/ folders.
Several tasks can share one root. The contents are documented per function; the tests in
test_tasks_vqa.py work their expected scores out from them by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

SHORT = "Answer the question using a single word or phrase."
VIZWIZ_HINT = "When the provided information is insufficient, respond with 'Unanswerable'."
SQA_HINT = "Answer with the option's letter from the given choices directly."


def _eval_dir(root: Path) -> Path:
    return Path(root) / "playground" / "data" / "eval"


def _image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> None:
    """A small solid image; the format follows the suffix (JPEG for COCO/GQA/VizWiz/TextVQA, PNG for SQA)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def make_vqav2(root: Path) -> Path:
    """vqav2/: 3 test-dev questions (ids 262144000, 262144001 on image 262144; 393225000 on image 393225),
    the test2015 list of 5 (the 3 plus 262144002 and 524291000, not answered), images of the test-dev ones."""
    d = _eval_dir(root) / "vqav2"
    q = lambda qid, img, text: {"question_id": qid, "image": f"COCO_test2015_{img:012d}.jpg",
                                "text": f"{text}\n{SHORT}", "category": "default"}
    dev = [q(262144000, 262144, "Is the ball flying towards the batter?"),
           q(262144001, 262144, "What sport is this?"),
           q(393225000, 393225, "How many dogs are there?")]
    full = dev[:2] + [q(262144002, 262144, "What color is the bat?")] + dev[2:] + [q(524291000, 524291, "Is it raining?")]
    _jsonl(d / "llava_vqav2_mscoco_test-dev2015.jsonl", dev)
    _jsonl(d / "llava_vqav2_mscoco_test2015.jsonl", full)
    _image(d / "test2015" / "COCO_test2015_000000262144.jpg", (200, 30, 30))
    _image(d / "test2015" / "COCO_test2015_000000393225.jpg", (30, 200, 30))
    return _eval_dir(root)


# VQAv2 val2014: question_id -> (image_id, question, the 10 human answers), in the questions file's order.
VQAV2_VAL = {
    42000: (42, "How many folders are there?", ["2", "2", "two", "3", "3", "3", "3", "4", "4", "several"]),
    42001: (42, "Is the door open?", ["yes"] * 10),
    73000: (73, "What color is the motorcycle?", ["red"] + ["black"] * 9),
}


def make_vqav2_val(root: Path) -> Path:
    """vqav2/: VQAv2's official val2014 files for the 3 questions of VQAV2_VAL (images 42 and 73) --
    v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json (10 answers each,
    with answer_confidence and answer_id as in the real file, plus an annotation of a question that is
    not in the questions file) -- and val2014/COCO_val2014_<image_id:012d>.jpg."""
    d = _eval_dir(root) / "vqav2"
    _json(d / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014",
        "questions": [{"image_id": img, "question": q, "question_id": qid} for qid, (img, q, _) in VQAV2_VAL.items()]})
    annotations = [{"question_type": "what", "multiple_choice_answer": answers[0], "answer_type": "other",
                    "image_id": img, "question_id": qid,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
                   for qid, (img, _, answers) in VQAV2_VAL.items()]
    annotations.insert(1, {**annotations[0], "question_id": 42002})  # only in the annotations: ignored
    _json(d / "v2_mscoco_val2014_annotations.json", {
        "info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco", "annotations": annotations})
    for i, img in enumerate(sorted({v[0] for v in VQAV2_VAL.values()})):
        _image(d / "val2014" / f"COCO_val2014_{img:012d}.jpg", (60, 60 + 100 * i, 200))
    return _eval_dir(root)


def make_gqa(root: Path) -> Path:
    """gqa/: 4 test-dev balanced questions and GQA's answers for them (all balanced; structural types
    verify, query, verify, query): "201307251" Is it overcast? -> no; "201640614" Who is wearing the
    dress? -> woman; "202225914" Does the utensil ... look clean and black? -> no; "20968458" What color is
    the sky? -> blue. Images under gqa/data/images."""
    d = _eval_dir(root) / "gqa"
    items = [("201307251", "n161313", "Is it overcast?", "no", "It is not overcast.", "verify"),
             ("201640614", "n235859", "Who is wearing the dress?", "woman", "The woman is wearing a dress.", "query"),
             ("202225914", "n336443", "Does the utensil on top of the table look clean and black?", "no",
              "No, the knife is clean but silver.", "verify"),
             ("20968458", "n161313", "What color is the sky?", "blue", "The sky is blue.", "query")]
    _jsonl(d / "llava_gqa_testdev_balanced.jsonl",
           [{"question_id": qid, "image": f"{img}.jpg", "text": f"{text}\n{SHORT}", "category": "default"}
            for qid, img, text, *_ in items])
    gold = {qid: {"semantic": [], "entailed": [], "equivalent": [qid], "question": text, "imageId": img,
                  "isBalanced": True, "groups": {"global": None, "local": "00-x"}, "answer": answer,
                  "semanticStr": "", "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
                  "types": {"detailed": "x", "semantic": "attr", "structural": structural}, "fullAnswer": full}
            for qid, img, text, answer, full, structural in items}
    _json(d / "data" / "testdev_balanced_questions.json", gold)
    for i, img in enumerate(sorted({it[1] for it in items})):
        _image(d / "data" / "images" / f"{img}.jpg", (40 * i, 90, 160))
    return _eval_dir(root)


def make_vizwiz(root: Path) -> Path:
    """vizwiz/: 3 test questions (ids 0, 1, 2; images VizWiz_test_0000000<id>.jpg) with LLaVA's two-line
    suffix; no answers (the test split is scored by the server)."""
    d = _eval_dir(root) / "vizwiz"
    texts = ["What is this? and what color is it?", "What is this?",
             "Has this oven gotten up to four hundred fifty degrees fahrenheit yet?"]
    _jsonl(d / "llava_test.jsonl", [{"question_id": i, "image": f"VizWiz_test_{i:08d}.jpg",
                                     "text": f"{t}\n{VIZWIZ_HINT}\n{SHORT}", "category": "default"}
                                    for i, t in enumerate(texts)])
    for i in range(3):
        _image(d / "test" / f"VizWiz_test_{i:08d}.jpg", (10, 10, 80 * i))
    return _eval_dir(root)


# VizWiz val: image -> (question, the 10 human answers), in val.json's order.
VIZWIZ_VAL = {
    "VizWiz_val_00000000.jpg": ("What is this?",
                                ["can of soup"] * 4 + ["soup"] * 3 + ["tomato soup"] * 2 + ["unanswerable"]),
    "VizWiz_val_00000001.jpg": ("What color is this shirt?", ["unanswerable"] * 2 + ["blue"] * 8),
    "VizWiz_val_00000002.jpg": ("Is the oven on?", ["no"] * 5 + ["yes"] * 5),
}


def make_vizwiz_val(root: Path) -> Path:
    """vizwiz/: VizWiz's official val.json for the 3 questions of VIZWIZ_VAL (one per image; answers
    with answer_confidence, plus answerable and answer_type) and the images under vizwiz/val/."""
    d = _eval_dir(root) / "vizwiz"
    _json(d / "val.json", [
        {"image": image, "question": q, "answerable": int(answers.count("unanswerable") < 3),
         "answer_type": "other", "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}
        for image, (q, answers) in VIZWIZ_VAL.items()])
    for i, image in enumerate(VIZWIZ_VAL):
        _image(d / "val" / image, (200, 80 * i, 10))
    return _eval_dir(root)


# TextVQA annotation answers (10 each); question_id in LLaVA's file is the image id.
TEXTVQA_ANSWERS = {
    ("003a8ae2ef43b901", "what is the brand of this camera?"):
        ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota", "dakota",
         "dakota digital", "dakota digital", "dakota", "dakota"],
    ("831bcec304a17054", "what brand liquor is on the right?"):
        ["bowmore islay", "bowmore", "bowmore", "bowmore", "bowmore", "bowmore islay", "bowmore",
         "bowmore", "bowmore", "bowmore islay"],
    ("831bcec304a17054", "how long has the drink on the right been aged?"):
        ["10 years", "10 years", "10 years", "10 year", "10", "10 years", "10 years", "ten years",
         "10 years", "10"],
    ("97b1112b17015396", "whats the lowest number yard line that you can see?"):
        ["30", "30", "30", "thirty", "30", "30", "30", "thirty", "30", "30"],
}


def make_textvqa(root: Path) -> Path:
    """textvqa/: 4 val questions with LLaVA's OCR-token prompts -- image 831bcec304a17054 has two questions
    (LLaVA's question_id is the image id, so it repeats), 97b1112b17015396 has no OCR tokens
    ("Reference OCR token: " then nothing) -- TextVQA_0.5.1_val.json with TEXTVQA_ANSWERS, and images."""
    d = _eval_dir(root) / "textvqa"
    ocr_liquor = "IGNET, N, MORANGIE, ISLAY, OWMOR, SINGLE, MALT, AGED, 10"
    rows = [("003a8ae2ef43b901", "What is the brand of this camera?", "DAKOTA, DIGITAL, Single-Use, Camera, Pire, digitat"),
            ("831bcec304a17054", "What brand liquor is on the right?", ocr_liquor),
            ("831bcec304a17054", "How long has the drink on the right been aged?", ocr_liquor),
            ("97b1112b17015396", "Whats the lowest number yard line that you can see?", "")]
    _jsonl(d / "llava_textvqa_val_v051_ocr.jsonl",
           [{"question_id": img, "image": f"{img}.jpg", "text": f"{q}\nReference OCR token: {ocr}\n{SHORT}",
             "category": "default"} for img, q, ocr in rows])
    data = [{"question": q, "image_id": img, "image_classes": ["Camera"], "flickr_original_url": "",
             "flickr_300k_url": "", "image_width": 12, "image_height": 8, "answers": answers,
             "question_tokens": q.split(), "question_id": 34602 + i, "set_name": "val"}
            for i, ((img, q), answers) in enumerate(TEXTVQA_ANSWERS.items())]
    _json(d / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa",
                                         "dataset_version": "0.5.1", "data": data})
    for i, img in enumerate(sorted({r[0] for r in rows})):
        _image(d / "train_images" / f"{img}.jpg", (90, 30 * i, 30))
    return _eval_dir(root)


# POPE: per split, (object, label) of the two questions; LLaVA's ids are 1.., 10000001.., 20000001...
POPE_ITEMS = {"adversarial": [("snowboard", "yes"), ("backpack", "no")],
              "random": [("snowboard", "yes"), ("car", "no")],
              "popular": [("person", "yes"), ("dining table", "no")]}
_POPE_OFFSET = {"adversarial": 0, "random": 10000000, "popular": 20000000}


def make_pope(root: Path) -> Path:
    """pope/: 6 questions, 2 per split (POPE_ITEMS), in LLaVA's order adversarial, random, popular; the
    first of each split on image COCO_val2014_000000310196.jpg, the second on ..._000000015738.jpg; the
    three coco/coco_pope_<split>.json label files (POPE's format) and the two val2014 images."""
    d = _eval_dir(root) / "pope"
    images = ["COCO_val2014_000000310196.jpg", "COCO_val2014_000000015738.jpg"]
    questions = []
    for split, items in POPE_ITEMS.items():
        labels = []
        for i, (obj, label) in enumerate(items):
            article = "an" if obj[0] in "aeiou" else "a"
            text = f"Is there {article} {obj} in the image?"
            questions.append({"question_id": _POPE_OFFSET[split] + i + 1, "image": images[i],
                              "text": f"{text}\n{SHORT}", "category": split})
            labels.append({"question_id": i + 1, "image": images[i], "text": text, "label": label})
        _jsonl(d / "coco" / f"coco_pope_{split}.json", labels)
    _jsonl(d / "llava_pope_test.jsonl", questions)
    for i, name in enumerate(images):
        _image(d / "val2014" / name, (120, 120, 60 * i))
    return _eval_dir(root)


def make_scienceqa(root: Path) -> Path:
    """scienceqa/: 4 test problems in llava_test_CQM-A.json: "4" (text only, 2 choices, answer B), "5"
    (image, 3 choices, answer B), "11" (image, 4 choices, answer D), "15" (text only, 5 choices, answer
    A); images/test/<id>/image.png; problems.json (plus train problem "1") and pid_splits.json."""
    d = _eval_dir(root) / "scienceqa"
    problems = {
        "1": ("Which tense does the sentence use?", ["past", "present", "future"], 0, None, "train"),
        "4": ("Which figure of speech is used in this text?", ["chiasmus", "apostrophe"], 1,
              "Sing, O goddess, the anger of Achilles son of Peleus.\n\u2014Homer, The Iliad", "test"),
        "5": ("Which of the following could Gordon's test show?",
              ["if the spacecraft was damaged", "how steady a parachute was", "whether it would swing"], 1,
              "Gordon tested a parachute in a wind tunnel.", "test"),
        "11": ("Which animal's feet are also adapted for walking on snow?", ["fox", "camel", "gecko", "lynx"], 3,
               "Lynx live in snowy forests.", "test"),
        "15": ("What is the mass of a bowling ball?", ["7 kilograms", "7 grams", "7 tons", "7 ounces", "7 pounds"], 0,
               "", "test"),
    }
    image_ids = {"5", "11"}
    entries = []
    for pid in ("4", "5", "11", "15"):
        question, choices, answer, hint, _ = problems[pid]
        options = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(choices))
        # LLaVA-1.5's file: "<image>\n" for an image problem, a "Context: hint" line when the hint is not empty,
        # the question, the options (fastllava/data/scienceqa.py eval_question writes the same)
        body = (f"Context: {hint}\n" if hint else "") + f"{question}\n{options}"
        entry = {"id": pid, "conversations": [{"from": "human", "value": body}, {"from": "gpt", "value": "ABCDE"[answer]}]}
        if pid in image_ids:
            entry = {"id": pid, "image": f"{pid}/image.png",
                     "conversations": [{"from": "human", "value": f"<image>\n{body}"}, entry["conversations"][1]]}
        entries.append(entry)
    _json(d / "llava_test_CQM-A.json", entries)
    _json(d / "problems.json", {
        pid: {"question": q, "choices": c, "answer": a, "hint": h, "image": "image.png" if pid in image_ids else None,
              "task": "closed choice", "grade": "grade5", "subject": "natural science", "topic": "x",
              "category": "x", "skill": "x", "lecture": "", "solution": "", "split": split}
        for pid, (q, c, a, h, split) in problems.items()})
    _json(d / "pid_splits.json", {"train": ["1"], "val": [], "test": ["4", "5", "11", "15"],
                                  "trainval": ["1"], "minitrain": [], "minival": [], "minitest": ["4"]})
    for i, pid in enumerate(sorted(image_ids)):
        _image(d / "images" / "test" / pid / "image.png", (250, 200, 100 * i))
    return _eval_dir(root)
