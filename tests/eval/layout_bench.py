"""Tiny copies of LLaVA's evaluation layout (`playground/data/eval`, docs/Evaluation.md) for MME, MMBench,
MMBench-CN, SEED-Bench, LLaVA-Bench-in-the-Wild and MM-Vet: LLaVA's folder and file names and line formats,
a few questions each, real (tiny) images written with PIL. Each `make_*(root)` writes its benchmark's folder
under `root` (which plays playground/data/eval) and returns `root`.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT = "Answer the question using a single word or phrase."


def _image(path: Path, color=(200, 30, 30), size=(8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _b64_png(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# MME: (subtask, image path under MME_Benchmark_release_version, [(question, answer)] * 2, ground-truth txt)
MME_ITEMS = [
    ("existence", "existence/000000000001.jpg", [("Is there a dog in this image?", "Yes"),
                                                 ("Is there a cat in this image?", "No")]),
    ("existence", "existence/000000000002.jpg", [("Is there a car in this image?", "No"),
                                                 ("Is there a bus in this image?", "Yes")]),
    ("artwork", "artwork/images/10002.jpg", [("Is this artwork created by vinci, leonardo da?", "Yes"),
                                             ("Is this artwork created by monet, claude?", "No")]),
    ("code_reasoning", "code_reasoning/0001.png", [("Is a python code shown in the picture?", "Yes"),
                                                   ("Is a c++ code shown in the picture?", "No")]),
]


def make_mme(root) -> Path:
    """MME/llava_mme.jsonl and MME/MME_Benchmark_release_version with three subtasks: existence (images and
    .txt side by side), artwork (images/ + questions_answers_YN/) and code_reasoning, whose second
    ground-truth line has MME's two spaces before "Please answer yes or no."."""
    root = Path(root)
    bench = root / "MME" / "MME_Benchmark_release_version"
    lines = []
    for n, (category, image, qas) in enumerate(MME_ITEMS):
        _image(bench / image, color=(40 * n, 90, 160))
        stem = Path(image).stem
        txt = (bench / category / "questions_answers_YN" / f"{stem}.txt" if "/images/" in image
               else bench / image).with_name(f"{stem}.txt")
        txt.parent.mkdir(parents=True, exist_ok=True)
        gt = []
        for k, (question, answer) in enumerate(qas):
            spaces = "  " if category == "code_reasoning" and k == 1 else " "
            gt.append(f"{question}{spaces}Please answer yes or no.\t{answer}\n")
            lines.append({"question_id": image, "image": image, "text": f"{question}\n{SHORT}", "category": category})
        txt.write_text("".join(gt), encoding="utf-8")
    _jsonl(root / "MME" / "llava_mme.jsonl", lines)
    return root


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split"]


def _mmbench_rows(questions) -> list[list[str]]:
    """Each (index, question, hint, options, answer letter, color) with its circular copies, as MMBench's
    legacy TSVs hold them: copy k has index + k * 1_000_000, the options rotated by k, the answer moved."""
    rows = []
    for index, question, hint, options, answer, color in questions:
        image = _b64_png(color)
        target = options[ord(answer) - ord("A")]
        for k in range(len(options)):
            rotated = options[k:] + options[:k]
            cells = rotated + [""] * (4 - len(rotated))
            rows.append([str(index + k * 1_000_000), question, hint, *cells, "ABCD"[rotated.index(target)],
                         "attribute_recognition", image, "made_up", "finegrained_perception", "nan", "dev"])
    return rows


def _write_tsv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(MMBENCH_COLUMNS)
        writer.writerows(rows)


def make_mmbench(root) -> Path:
    """mmbench/mmbench_dev_20230712.tsv: question 0 (four options, no hint: 4 rows) and question 1 (two
    options, a two-line hint: 2 rows), base64 PNG images."""
    root = Path(root)
    _write_tsv(root / "mmbench" / "mmbench_dev_20230712.tsv", _mmbench_rows([
        (0, "What color is the square?", "nan", ["red", "green", "blue", "yellow"], "A", (220, 0, 0)),
        (1, "Is the picture dark?", "Look at the picture.\nThen answer.", ["yes", "no"], "B", (250, 250, 250)),
    ]))
    return root


def make_mmbench_cn(root) -> Path:
    """mmbench_cn/mmbench_dev_cn_20231003.tsv (mmbench_cn.sh's folder): one three-option question, 3 rows."""
    root = Path(root)
    _write_tsv(root / "mmbench_cn" / "mmbench_dev_cn_20231003.tsv", _mmbench_rows([
        (5, "图中方块是什么颜色？", "请仔细看图。", ["红色", "绿色", "蓝色"], "C", (0, 0, 220)),
    ]))
    return root


SEED_QUESTIONS = [  # question_id, question_type_id, data_type, question, choices, answer, media
    ("101669", 5, "image", "How many towels are in the image?", ["One", "Two", "Three", "Four"], "B",
     "1454426_2591111986.jpg"),
    ("101670", 1, "image", "What is the main setting of the image?", ["A beach", "A kitchen", "A forest", "A road"], "C",
     "1454427_1.jpg"),
    ("v2001", 10, "video", "What is the action being carried out in the video?",
     ["Pushing something", "Lifting something", "Dropping something", "Spinning something"], "D", "185678.webm"),
]


def make_seed(root) -> Path:
    """seed_bench/: SEED-Bench.json (2 image questions, 1 video question), llava-seed-bench.jsonl,
    SEED-Bench-image/<data_id> and the video question's middle frame SEED-Bench-video-image/10_v2001.png."""
    root = Path(root) / "seed_bench"
    annotation = {"question_type": {"Scene Understanding": 1, "Instances Counting": 5, "Action Recognition": 10},
                  "questions": []}
    lines = []
    for n, (qid, type_id, data_type, question, choices, answer, data_id) in enumerate(SEED_QUESTIONS):
        annotation["questions"].append({
            "answer": answer, "choice_a": choices[0], "choice_b": choices[1], "choice_c": choices[2],
            "choice_d": choices[3], "data_id": data_id, "data_type": data_type, "question": question,
            "question_id": qid, "question_type_id": type_id})
        image = f"SEED-Bench-image/{data_id}" if data_type == "image" else f"SEED-Bench-video-image/{type_id}_{qid}.png"
        _image(root / image, color=(30 * n, 200, 90))
        text = question + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices)) + "\n" + MC_SUFFIX
        lines.append({"image": image, "text": text, "category": data_type, "question_id": qid})
    root.mkdir(parents=True, exist_ok=True)
    (root / "SEED-Bench.json").write_text(json.dumps(annotation), encoding="utf-8")
    _jsonl(root / "llava-seed-bench.jsonl", lines)
    return root.parent


def make_llava_bench(root) -> Path:
    """llava-bench-in-the-wild/: questions.jsonl (conv, detail, complex on two images), images/,
    context.jsonl (captions; one as a list of sentences) and answers_gpt4.jsonl (the reference answers)."""
    root = Path(root)
    folder = root / "llava-bench-in-the-wild"
    _image(folder / "images" / "001.jpg", (10, 120, 200))
    _image(folder / "images" / "002.jpg", (240, 200, 0))
    questions = [
        {"image": "001.jpg", "text": "What is the name of this famous sight in the photo?", "category": "conv", "question_id": 0},
        {"image": "001.jpg", "text": "Describe this photo in detail.", "category": "detail", "question_id": 1},
        {"image": "002.jpg", "text": "Why might these fruits be sold here?", "category": "complex", "question_id": 2},
    ]
    _jsonl(folder / "questions.jsonl", questions)
    _jsonl(folder / "context.jsonl", [
        {"id": "001", "image": "001.jpg", "caption": "A volcanic crater next to a city by the ocean."},
        {"id": "002", "image": "002.jpg", "caption": ["A market stall.", "Yellow fruits are piled up."]},
    ])
    _jsonl(folder / "answers_gpt4.jsonl", [
        {"question_id": q["question_id"], "prompt": q["text"], "text": f"Reference answer {q['question_id']}.",
         "answer_id": f"ref{q['question_id']}", "model_id": "gpt-4-0314", "metadata": {}} for q in questions])
    return root


def make_mmvet(root) -> Path:
    """mm-vet/ (mmvet.sh's folder): llava-mm-vet.jsonl (3 questions), images/ and mm-vet.json."""
    root = Path(root)
    folder = root / "mm-vet"
    samples = {
        "v1_0": {"imagename": "v1_0.png", "capability": ["ocr", "math"], "question": "What is x in the equation?",
                 "answer": "-1<AND>-5"},
        "v1_1": {"imagename": "v1_1.png", "capability": ["rec"], "question": "What animal is shown?", "answer": "cat"},
        "v1_2": {"imagename": "v1_1.png", "capability": ["rec", "know"], "question": "Is it a pet?", "answer": "yes"},
    }
    for n, name in enumerate(["v1_0.png", "v1_1.png"]):
        _image(folder / "images" / name, (n * 100, 50, 50))
    (folder / "mm-vet.json").write_text(json.dumps(samples, indent=2), encoding="utf-8")
    _jsonl(folder / "llava-mm-vet.jsonl", [
        {"image": s["imagename"], "text": s["question"], "category": "conv", "question_id": int(k[3:])}
        for k, s in samples.items()])
    return root
