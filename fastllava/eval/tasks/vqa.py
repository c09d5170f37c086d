"""Short-answer VQA benchmarks of LLaVA-1.5: VQAv2, GQA, VizWiz and TextVQA.

Each reads LLaVA's question jsonl (one {"question_id", "image", "text", "category"} per line, the
instruction suffix already inside "text") and its image folder, as LLaVA's scripts/v1_5/eval/<task>.sh pass
them to llava/eval/model_vqa_loader.py (max_new_tokens 128, that script's default). Scoring follows the
script's next step: VQAv2 and VizWiz only get the upload file of their evaluation server; GQA is scored as
GQA's eval.py scores LLaVA's converted predictions; TextVQA as llava/eval/eval_textvqa.py. The rules
themselves live in fastllava/eval/scorers.py.

VQAv2 and VizWiz also have a "val" split (`--split val`), read from the datasets' official val files with
LLaVA's instruction lines added, and scored here with the VQA accuracy TextVQA is scored with (metric
val_accuracy: not comparable to the published test numbers).

Each split is also read from the Hub dataset lmms-eval's task names (`--data hub`, fastllava/eval/hub.py):
`load_hub` gives the questions `load` gives for the same questions -- LLaVA's ids, prompts (LLaVA's
instruction lines, not lmms-eval's capitalized questions), images and ground truth -- in the rows' order.
What the Hub lacks is said where it matters: VQAv2's test-dev rows do not list all of test2015 (the upload's
padding), and TextVQA's OCR line is built from the rows' ocr_tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from ..scorers import gqa_prediction, normalize_vqa_answer, textvqa_question, vqa_accuracy
from .base import SHORT_ANSWER, EvalDataError, EvalQuestion, HubJoin, HubSource, Task
from .reading import image_cell, image_file, read_json, read_jsonl, read_questions

log = logging.getLogger(__name__)

# The instruction lines of LLaVA's converted question files (llava_vqav2_mscoco_test-dev2015.jsonl,
# vizwiz/llava_test.jsonl): the val splits, read from the official files, get the same text.
VIZWIZ_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."


def _check_answers(questions: Sequence[EvalQuestion], answers: Sequence[str]) -> None:
    if len(questions) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions")


def _check_split(task: Task, split: str) -> str:
    if split not in task.splits:
        raise ValueError(f"task {task.name} has no split {split!r} (its splits are {', '.join(task.splits)})")
    return split


def _json_list(path: Path, key: str, what: str) -> list:
    """doc[key] of a JSON document {key: [...], ...} (VQAv2's official files)."""
    items = read_json(path, dict).get(key)
    if not isinstance(items, list):
        raise EvalDataError(path, None, f'expected {{"{key}": [...]}} ({what})')
    return items


def _human_answers(entry: dict, path: Path, where: str) -> list[str]:
    """The "answer" strings of entry["answers"] (VQAv2 / VizWiz annotation: [{"answer", ...}, ...])."""
    answers = entry.get("answers")
    if not (isinstance(answers, list) and answers
            and all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers)):
        raise EvalDataError(path, None, f'{where}: expected "answers": a non-empty list of {{"answer": str, ...}}')
    return [a["answer"] for a in answers]


def _mean_vqa_accuracy(questions: Sequence[EvalQuestion], answers: Sequence[str]) -> float:
    """Mean `vqa_accuracy` against each question's truth["answers"], in percent."""
    return 100.0 * sum(vqa_accuracy(a, q.truth["answers"]) for q, a in zip(questions, answers)) / len(questions)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


class _Images:
    """Hub rows' images, one reference per image key: the questions on one image share it (GQA's 12,578
    questions name 398 images; VQAv2's test-dev ~5 questions per image). Nothing is kept without `enabled`
    (scoring an answers file)."""

    def __init__(self, enabled: bool):
        self.enabled, self.first = enabled, {}

    def __call__(self, key, cell, file: Path, row: int) -> list:
        if not self.enabled:
            return []
        if key not in self.first:
            self.first[key] = image_cell(cell, file, row)
        return [self.first[key]]


def _text(row: dict, file: Path, i: int, column: str = "question") -> str:
    """A row's string cell; EvalDataError naming the file and row where it is not a string."""
    value = row[column]
    if not isinstance(value, str):
        raise EvalDataError(file, None, f"row {i}: expected {column!r} to be a string, got {type(value).__name__}")
    return value


def _strings(row: dict, file: Path, i: int, column: str, *, empty: bool = False) -> list[str]:
    """A row's list-of-strings cell (answers, OCR tokens); EvalDataError naming the file and row otherwise."""
    value = row[column]
    if not (isinstance(value, list) and (value or empty) and all(isinstance(v, str) for v in value)):
        raise EvalDataError(file, None, f"row {i}: expected {column!r} to be a {'' if empty else 'non-empty '}list "
                                        f"of strings, got {value!r}")
    return value


class VQAv2(Task):
    """VQAv2, on test-dev (LLaVA's, for the EvalAI server) or val2014 (scored here).

    split "test-dev" (default), under --data (LLaVA's playground/data/eval):
      vqav2/llava_vqav2_mscoco_test-dev2015.jsonl  the questions answered (from LLaVA's eval.zip)
      vqav2/llava_vqav2_mscoco_test2015.jsonl      every test2015 question: the upload must list them all
      vqav2/test2015/<image>                       COCO test2015 images
    score() writes answers_upload/llava_vqav2_mscoco_test-dev2015.json: [{"question_id", "answer"}] for
    every test2015 question, answers normalized as EvalAI does and "" where unanswered
    (scripts/convert_vqav2_for_submission.py), and returns {}.

    split "val", VQAv2's official val2014 files:
      vqav2/v2_OpenEnded_mscoco_val2014_questions.json  {"questions": [{"image_id", "question", "question_id"}]}
      vqav2/v2_mscoco_val2014_annotations.json          {"annotations": [{"question_id", "answers": [{"answer"}]}]}
      vqav2/val2014/COCO_val2014_<image_id:012d>.jpg    COCO val2014 images
    The text is the question plus "\n" + SHORT_ANSWER, as in LLaVA's converted test-dev file. score()
    returns val_accuracy: the mean VQA accuracy against the 10 human answers, in percent, by the rule
    LLaVA scores TextVQA with (`vqa_accuracy`; it normalizes every answer, where the official VQA script
    normalizes only where humans disagree, so the two can differ slightly). It also writes
    vqav2_val2014_results.json, [{"question_id", "answer"}] with normalized answers: the results format
    of the official VQA evaluation code.
    """

    name = "vqav2"
    max_new_tokens = 128
    splits = ("test-dev", "val")
    # LLaVA's MODEL_ZOO.md: EvalAI test-dev accuracy of the upload file (not computable locally). The val
    # split's metric is called val_accuracy so that no test-dev number is printed next to it (run.py's
    # score_table pairs metrics by name): val2014 is a different question set, not comparable.
    published = {"llava-v1.5-7b": {"accuracy": 78.5}, "llava-v1.5-13b": {"accuracy": 80.0}}
    question_file = "llava_vqav2_mscoco_test-dev2015"
    full_file = "llava_vqav2_mscoco_test2015"
    val_questions = "v2_OpenEnded_mscoco_val2014_questions.json"
    val_annotations = "v2_mscoco_val2014_annotations.json"
    # lmms-eval's vqav2 tasks; its "testdev" split is LLaVA's test-dev question file (107,394 questions). The
    # upload must list every test2015 question, which only the 447,793-row "test" split (images inline, tens
    # of GB) holds: from the Hub the upload lists the answered questions (see score).
    hub = HubSource("lmms-lab/VQAv2", "data/testdev-*.parquet", ("question_id", "question", "image_id", "image"))
    hub_val = HubSource("lmms-lab/VQAv2", "data/validation-*.parquet",
                        ("question_id", "question", "image_id", "answers", "image"))

    def __init__(self, split: str = "test-dev"):
        self.split = _check_split(self, split)
        if split == "val":
            self.hub = self.hub_val

    def load(self, data_dir: Path, *, images: bool = True) -> list[EvalQuestion]:
        root = Path(data_dir) / "vqav2"
        if self.split == "val":
            return self._load_val(root, images)
        full = root / f"{self.full_file}.jsonl"
        # Checked now, not after hours of generation: the upload cannot be written without it.
        if not full.is_file():
            raise EvalDataError(full, None, "missing LLaVA's list of all test2015 questions, needed for the "
                                            "EvalAI upload file (it ships in LLaVA's eval.zip)")
        rows = read_questions(root / f"{self.question_file}.jsonl", root / "test2015", images=images)
        return [EvalQuestion(rec["question_id"], rec["text"], [image], truth={"full_split": str(full)})
                for _, rec, image in rows]

    def load_hub(self, rows, *, images: bool = True) -> list[EvalQuestion]:
        """lmms-lab/VQAv2 rows (testdev, or validation for --split val): the question plus LLaVA's short-answer
        line, the row's question_id; val's truth the 10 human answers. Test-dev questions carry no list of all
        test2015 questions (full_split None)."""
        decode = _Images(images)
        questions = []
        for file, i, row in rows:
            if not isinstance(row["question_id"], int) or not isinstance(row["image_id"], int):
                raise EvalDataError(file, None, f"row {i}: expected integer question_id and image_id, got "
                                                f"{row['question_id']!r}, {row['image_id']!r}")
            qid = row["question_id"]
            truth = ({"answers": _human_answers(row, file, f"row {i} (question_id {qid})")} if self.split == "val"
                     else {"full_split": None})
            questions.append(EvalQuestion(qid, f"{_text(row, file, i)}\n{SHORT_ANSWER}",
                                          decode(row["image_id"], row["image"], file, i), truth=truth))
        return questions

    def _load_val(self, root: Path, images: bool) -> list[EvalQuestion]:
        path, ann_path = root / self.val_questions, root / self.val_annotations
        entries = _json_list(path, "questions", "VQAv2 questions")
        answers = {}
        for i, ann in enumerate(_json_list(ann_path, "annotations", "VQAv2 annotations")):
            if not isinstance(ann, dict) or "question_id" not in ann:
                raise EvalDataError(ann_path, None, f'annotations[{i}]: expected {{"question_id", "answers", ...}}')
            answers[ann["question_id"]] = _human_answers(ann, ann_path, f"annotations[{i}] (question_id {ann['question_id']!r})")
        questions, seen = [], {}
        for i, entry in enumerate(entries):
            if not (isinstance(entry, dict) and isinstance(entry.get("image_id"), int)
                    and isinstance(entry.get("question"), str) and "question_id" in entry):
                raise EvalDataError(path, None, f"questions[{i}]: expected image_id (int), question (str) and question_id")
            qid = entry["question_id"]
            where = f"questions[{i}] (question_id {qid!r})"
            if qid in seen:
                raise EvalDataError(path, None, f"{where}: duplicate question_id (first at questions[{seen[qid]}])")
            seen[qid] = i
            if qid not in answers:
                raise EvalDataError(path, None, f"{where}: no annotation with this question_id in {ann_path}")
            image = image_file(root / "val2014", f"COCO_val2014_{entry['image_id']:012d}.jpg", path, None,
                               check=images)
            questions.append(EvalQuestion(qid, f"{entry['question']}\n{SHORT_ANSWER}", [image],
                                          truth={"answers": answers[qid]}))
        return questions

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        _check_answers(questions, answers)
        if not questions:
            return {}
        if self.split == "val":
            path = Path(output_dir) / "vqav2_val2014_results.json"
            _write_json(path, [{"question_id": q.question_id, "answer": normalize_vqa_answer(a)}
                               for q, a in zip(questions, answers)])
            accuracy = _mean_vqa_accuracy(questions, answers)
            log.info("vqav2 val: wrote %s; %d questions, val_accuracy %.2f%%", path, len(questions), accuracy)
            return {"val_accuracy": accuracy}
        if questions[0].truth["full_split"] is None:
            return self._upload_answered(questions, answers, output_dir)
        given = {q.question_id: a for q, a in zip(questions, answers)}
        full = Path(questions[0].truth["full_split"])
        upload = []
        for number, rec in read_jsonl(full, what="LLaVA's list of all test2015 questions"):
            if "question_id" not in rec:
                raise EvalDataError(full, number, "expected a question_id field")
            qid = rec["question_id"]
            # convert_vqav2_for_submission.py: normalized answer, or "" for a question not answered.
            upload.append({"question_id": qid, "answer": normalize_vqa_answer(given[qid]) if qid in given else ""})
        covered = sum(1 for row in upload if row["question_id"] in given)
        if covered != len(given):
            log.warning("vqav2: %d answered questions are not in %s and are left out of the upload",
                        len(given) - covered, full)
        path = Path(output_dir) / "answers_upload" / f"{self.question_file}.json"
        _write_json(path, upload)
        log.info("vqav2: wrote %s (%d answers for %d test2015 questions); no local score: submit it to the "
                 "VQAv2 EvalAI server (test-dev phase)", path, covered, len(upload))
        return {}

    def _upload_answered(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict:
        """The upload from Hub rows: the answered questions only, normalized as EvalAI does, in question order.
        LLaVA's converter also lists every other test2015 question with an empty answer, which the server
        wants; the Hub's test-dev split does not name them."""
        path = Path(output_dir) / "answers_upload" / f"{self.question_file}.json"
        _write_json(path, [{"question_id": q.question_id, "answer": normalize_vqa_answer(a)}
                           for q, a in zip(questions, answers)])
        log.warning("vqav2: wrote %s with the %d answered questions only: the VQAv2 EvalAI server expects every "
                    "test2015 question, which the Hub's test-dev split does not list. To write the padded file, "
                    "score this answers file again with --answers and --data set to LLaVA's eval folder (only its "
                    "vqav2/%s.jsonl and %s.jsonl are read, no image)",
                    path, len(questions), self.question_file, self.full_file)
        return {}


class VizWiz(Task):
    """VizWiz-VQA, on test (LLaVA's, for the EvalAI server) or val (scored here).

    split "test" (default): vizwiz/llava_test.jsonl (LLaVA's eval.zip), vizwiz/test/<image>.
    score() writes answers_upload/vizwiz_test.json: [{"image", "answer"}] per question of llava_test.jsonl,
    answers normalized as EvalAI does (scripts/convert_vizwiz_for_submission.py), and returns {}.

    split "val", VizWiz's official files: vizwiz/val.json (a JSON list of {"image", "question", "answers":
    [{"answer", "answer_confidence"}] x10, "answerable", "answer_type"}) and vizwiz/val/<image>. The
    question id is the image file name (one question per image); the text is the question plus the two
    lines LLaVA's llava_test.jsonl appends (VIZWIZ_UNANSWERABLE, SHORT_ANSWER). score() writes
    answers_upload/vizwiz_val.json in the test upload's format and returns val_accuracy: the mean VQA
    accuracy (`vqa_accuracy`) against the human answers, in percent.
    """

    name = "vizwiz"
    max_new_tokens = 128
    splits = ("test", "val")
    # LLaVA's MODEL_ZOO.md: EvalAI test-dev accuracy of the upload file (not computable locally). The val
    # split's metric is val_accuracy, so that this test-dev number is not printed next to it: not comparable.
    published = {"llava-v1.5-7b": {"accuracy": 50.0}, "llava-v1.5-13b": {"accuracy": 53.6}}
    val_file = "val.json"
    # lmms-eval's vizwiz_vqa tasks: VizWiz's test (8,000 questions, LLaVA's llava_test.jsonl) and val (4,319) splits.
    hub = HubSource("lmms-lab/VizWiz-VQA", "data/test-*.parquet", ("question_id", "question", "image"))
    hub_val = HubSource("lmms-lab/VizWiz-VQA", "data/val-*.parquet", ("question_id", "question", "answers", "image"))

    def __init__(self, split: str = "test"):
        self.split = _check_split(self, split)
        if split == "val":
            self.hub = self.hub_val

    def load(self, data_dir: Path, *, images: bool = True) -> list[EvalQuestion]:
        root = Path(data_dir) / "vizwiz"
        if self.split == "val":
            return self._load_val(root, images)
        path = root / "llava_test.jsonl"
        rows = read_questions(path, root / "test", images=images)
        return [EvalQuestion(rec["question_id"], rec["text"], [image], truth={"image": rec["image"], "total": len(rows)})
                for _, rec, image in rows]

    def load_hub(self, rows, *, images: bool = True) -> list[EvalQuestion]:
        """lmms-lab/VizWiz-VQA rows (test, or val): question_id is the image's file stem (VizWiz_test_00000000);
        LLaVA's test id is its number, the val id the file name, as `load` reads them. The question as asked
        (lmms-eval capitalizes it; LLaVA does not) plus LLaVA's two instruction lines; val's truth the human
        answers."""
        decode = _Images(images)
        questions = []
        prefix = f"VizWiz_{self.split}_"
        for file, i, row in rows:
            stem = _text(row, file, i, "question_id")
            number = stem.removeprefix(prefix)
            if not (stem.startswith(prefix) and number.isdigit()):
                raise EvalDataError(file, None, f"row {i}: expected a question_id {prefix}<number>, got {stem!r}")
            name = f"{stem}.jpg"
            text = f"{_text(row, file, i)}\n{VIZWIZ_UNANSWERABLE}\n{SHORT_ANSWER}"
            if self.split == "val":
                qid, truth = name, {"image": name, "answers": _strings(row, file, i, "answers")}
            else:
                qid, truth = int(number), {"image": name, "total": len(rows)}
            questions.append(EvalQuestion(qid, text, decode(stem, row["image"], file, i), truth=truth))
        return questions

    def _load_val(self, root: Path, images: bool) -> list[EvalQuestion]:
        path = root / self.val_file
        questions, seen = [], {}
        for i, entry in enumerate(read_json(path, list)):
            if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)
                    and isinstance(entry.get("question"), str)):
                raise EvalDataError(path, None, f'entry {i}: expected {{"image": str, "question": str, "answers", ...}}')
            name = entry["image"]
            where = f"entry {i} (image {name!r})"
            if name in seen:
                raise EvalDataError(path, None, f"{where}: duplicate image (first at entry {seen[name]}); the "
                                                "image names the question")
            seen[name] = i
            answers = _human_answers(entry, path, where)
            image = image_file(root / "val", name, path, None, check=images)
            text = f"{entry['question']}\n{VIZWIZ_UNANSWERABLE}\n{SHORT_ANSWER}"
            questions.append(EvalQuestion(name, text, [image], truth={"image": name, "answers": answers}))
        return questions

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        _check_answers(questions, answers)
        if not questions:
            return {}
        upload = [{"image": q.truth["image"], "answer": normalize_vqa_answer(a)} for q, a in zip(questions, answers)]
        path = Path(output_dir) / "answers_upload" / f"vizwiz_{self.split}.json"
        _write_json(path, upload)
        if self.split == "val":
            accuracy = _mean_vqa_accuracy(questions, answers)
            log.info("vizwiz val: wrote %s; %d questions, val_accuracy %.2f%%", path, len(questions), accuracy)
            return {"val_accuracy": accuracy}
        # LLaVA's converter asserts every question is answered; say so when some are not (e.g. --limit).
        total = questions[0].truth["total"]
        if len(upload) < total:
            log.warning("vizwiz: only %d of the %d questions are answered: the server expects all of them",
                        len(upload), total)
        log.info("vizwiz: wrote %s (%d answers); no local score: submit it to the VizWiz EvalAI server",
                 path, len(upload))
        return {}


class GQA(Task):
    """GQA test-dev balanced, scored as GQA's eval.py scores LLaVA's converted predictions.

    Layout: gqa/llava_gqa_testdev_balanced.jsonl (LLaVA's eval.zip), gqa/data/images/<image>, and for a
    local score GQA's gqa/data/testdev_balanced_questions.json ({question_id: {"answer", "isBalanced",
    "types": {"structural"}, ...}}). score() writes testdev_balanced_predictions.json
    ([{"questionId", "prediction"}], scripts/convert_gqa_for_eval.py) and returns accuracy, binary
    (structural type other than "query") and open ("query"), over the balanced questions, in percent.
    """

    name = "gqa"
    max_new_tokens = 128
    published = {"llava-v1.5-7b": {"accuracy": 62.0}, "llava-v1.5-13b": {"accuracy": 63.3}}
    gold_file = "testdev_balanced_questions.json"
    # lmms-eval's gqa.yaml: the questions of testdev_balanced_instructions (12,578, as LLaVA's file), each naming
    # its image by imageId, the images in the repository's testdev_balanced_images config (398 rows).
    hub = HubSource("lmms-lab/GQA", "testdev_balanced_instructions/testdev-*.parquet",
                    ("id", "imageId", "question", "answer", "isBalanced", "types"),
                    join=HubJoin("testdev_balanced_images/testdev-*.parquet", key="id", on="imageId", columns=("image",)))

    def load(self, data_dir: Path, *, images: bool = True) -> list[EvalQuestion]:
        root = Path(data_dir) / "gqa"
        path = root / "llava_gqa_testdev_balanced.jsonl"
        rows = read_questions(path, root / "data" / "images", images=images)
        gold_path = root / "data" / self.gold_file
        gold = read_json(gold_path, dict) if gold_path.is_file() else None
        if gold is None:
            log.warning("gqa: %s not found: answers will not be scored locally", gold_path)
        else:  # eval.py wants a prediction for each of these
            balanced = sum(1 for e in gold.values() if isinstance(e, dict) and e.get("isBalanced", True))
        questions = []
        for number, rec, image in rows:
            truth = {}
            if gold is not None:
                entry = gold.get(str(rec["question_id"]))
                if not isinstance(entry, dict) or "answer" not in entry:
                    raise EvalDataError(path, number, f"question {rec['question_id']!r} has no answer in {gold_path}")
                truth = {"answer": entry["answer"], "balanced": entry.get("isBalanced", True),
                         "structural": (entry.get("types") or {}).get("structural"), "gold_balanced": balanced}
            questions.append(EvalQuestion(rec["question_id"], rec["text"], [image], truth=truth))
        return questions

    def load_hub(self, rows, *, images: bool = True) -> list[EvalQuestion]:
        """lmms-lab/GQA rows (testdev_balanced_instructions joined to their images): the row's id, the question
        plus LLaVA's short-answer line, the gold answer, balance and structural type as GQA's questions file
        gives them (the rows are that file's entries)."""
        decode = _Images(images)
        balanced = sum(1 for _, _, row in rows if row["isBalanced"] is not False)
        questions = []
        for file, i, row in rows:
            qid, answer = _text(row, file, i, "id"), _text(row, file, i, "answer")
            truth = {"answer": answer, "balanced": row["isBalanced"] is not False,
                     "structural": (row["types"] or {}).get("structural"), "gold_balanced": balanced}
            questions.append(EvalQuestion(qid, f"{_text(row, file, i)}\n{SHORT_ANSWER}",
                                          decode(row["imageId"], row["image"], file, i), truth=truth))
        return questions

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        _check_answers(questions, answers)
        path = Path(output_dir) / "testdev_balanced_predictions.json"
        _write_json(path, [{"questionId": q.question_id, "prediction": gqa_prediction(a)}
                           for q, a in zip(questions, answers)])
        log.info("gqa: wrote %s (input of GQA's eval.py --tier testdev_balanced)", path)
        if not questions or "answer" not in questions[0].truth:
            log.warning("gqa: no %s in the data directory: no local score", self.gold_file)
            return {}
        groups: dict[str, list[bool]] = {"accuracy": [], "binary": [], "open": []}
        for q, a in zip(questions, answers):
            if not q.truth["balanced"]:  # eval.py scores the balanced questions only
                continue
            # eval.py compares the converted prediction to the gold answer string.
            correct = gqa_prediction(a) == q.truth["answer"]
            groups["accuracy"].append(correct)
            if q.truth["structural"] is not None:
                groups["open" if q.truth["structural"] == "query" else "binary"].append(correct)
        missing = questions[0].truth["gold_balanced"] - len(groups["accuracy"])
        if missing > 0:
            log.warning("gqa: %d balanced questions of %s have no answer here; GQA's eval.py would refuse to "
                        "score, the scores below cover the answered ones", missing, self.gold_file)
        scores = {k: 100.0 * sum(v) / len(v) for k, v in groups.items() if v}
        for k, v in scores.items():
            log.info("gqa: %s %.2f%% (%d questions)", k, v, len(groups[k]))
        return scores


class TextVQA(Task):
    """TextVQA val with LLaVA's OCR-token prompts, scored as llava/eval/eval_textvqa.py.

    Layout: textvqa/llava_textvqa_val_v051_ocr.jsonl (LLaVA's eval.zip), textvqa/train_images/<image>, and
    for a local score textvqa/TextVQA_0.5.1_val.json ({"data": [{"image_id", "question", "answers"}]}).

    LLaVA's question_id here is the IMAGE id, shared by the questions of one image; LLaVA tells them apart
    by (question_id, lower-cased question). EvalQuestion.question_id is therefore "<image id>#<k>" (k-th
    question of that image in file order), and record["question_id"] restores LLaVA's id in the answers
    file, so eval_textvqa.py can read that file.
    """

    name = "textvqa"
    max_new_tokens = 128
    published = {"llava-v1.5-7b": {"accuracy": 58.2}, "llava-v1.5-13b": {"accuracy": 61.3}}
    annotation_file = "TextVQA_0.5.1_val.json"
    # lmms-eval's textvqa_val: TextVQA 0.5.1 val (5,000 questions) with the human answers and the Rosetta OCR
    # tokens of each image (lmms-eval leaves them out of its prompt by default; LLaVA's file has them).
    hub = HubSource("lmms-lab/textvqa", "data/validation-*.parquet",
                    ("question_id", "image_id", "question", "answers", "ocr_tokens", "image"))

    def load(self, data_dir: Path, *, images: bool = True) -> list[EvalQuestion]:
        root = Path(data_dir) / "textvqa"
        path = root / "llava_textvqa_val_v051_ocr.jsonl"

        def key(rec: dict) -> tuple:  # what eval_textvqa.py looks annotations up by
            return rec["question_id"], textvqa_question(rec["text"])

        rows = read_questions(path, root / "train_images", key=key, images=images)
        annotations = self._annotations(root / self.annotation_file)
        questions, per_image = [], {}
        for number, rec, image in rows:
            qid, question = key(rec)
            per_image[qid] = per_image.get(qid, 0) + 1
            truth = {}
            if annotations is not None:
                if (qid, question) not in annotations:
                    raise EvalDataError(path, number, f"no entry with image_id {qid!r} and question {question!r} "
                                                      f"in {root / self.annotation_file}")
                truth = {"answers": annotations[qid, question]}
            questions.append(EvalQuestion(f"{qid}#{per_image[qid]}", rec["text"], [image],
                                          record={"question_id": qid}, truth=truth))
        return questions

    def load_hub(self, rows, *, images: bool = True) -> list[EvalQuestion]:
        """lmms-lab/textvqa validation rows: LLaVA's prompt (question, "Reference OCR token: " and the row's
        ocr_tokens joined by ", ", the short-answer line), LLaVA's id (the image id, numbered per image as in
        `load`), the row's human answers. The OCR line equals LLaVA's where the rows' ocr_tokens are the Rosetta
        tokens LLaVA's question file was written from (both come from TextVQA's release)."""
        decode = _Images(images)
        questions, per_image = [], {}
        for file, i, row in rows:
            image_id = _text(row, file, i, "image_id")
            tokens, answers = _strings(row, file, i, "ocr_tokens", empty=True), _strings(row, file, i, "answers")
            per_image[image_id] = per_image.get(image_id, 0) + 1
            text = f"{_text(row, file, i)}\nReference OCR token: {', '.join(tokens)}\n{SHORT_ANSWER}"
            questions.append(EvalQuestion(f"{image_id}#{per_image[image_id]}", text,
                                          decode(image_id, row["image"], file, i),
                                          record={"question_id": image_id}, truth={"answers": answers}))
        return questions

    @staticmethod
    def _annotations(path: Path) -> dict[tuple, list[str]] | None:
        """(image_id, lower-cased question) -> the human answers; a later duplicate wins, as in LLaVA's dict."""
        if not path.is_file():
            log.warning("textvqa: %s not found: answers will not be scored locally", path)
            return None
        data = read_json(path, dict).get("data")
        if not isinstance(data, list):
            raise EvalDataError(path, None, 'expected {"data": [...]} (TextVQA 0.5.1 annotations)')
        table = {}
        for i, entry in enumerate(data):
            if not (isinstance(entry, dict) and {"image_id", "question", "answers"} <= entry.keys()):
                raise EvalDataError(path, None, f"data[{i}]: expected image_id, question and answers")
            table[entry["image_id"], entry["question"].lower()] = list(entry["answers"])
        return table

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        _check_answers(questions, answers)
        if not questions or "answers" not in questions[0].truth:
            log.warning("textvqa: no %s in the data directory: no local score", self.annotation_file)
            return {}
        accuracy = _mean_vqa_accuracy(questions, answers)
        log.info("textvqa: samples %d, accuracy %.2f%%", len(questions), accuracy)
        return {"accuracy": accuracy}

