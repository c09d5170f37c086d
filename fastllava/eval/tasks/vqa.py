"""Short-answer VQA benchmarks of LLaVA-1.5: VQAv2, GQA, VizWiz and TextVQA.

Each reads LLaVA's question jsonl (one {"question_id", "image", "text", "category"} per line, the
instruction suffix already inside "text") and its image folder, as LLaVA's scripts/v1_5/eval/<task>.sh pass
them to llava/eval/model_vqa_loader.py (max_new_tokens 128, that script's default). Scoring follows the
script's next step: VQAv2 and VizWiz only get the upload file of their evaluation server; GQA is scored as
GQA's eval.py scores LLaVA's converted predictions; TextVQA as llava/eval/eval_textvqa.py. The rules
themselves live in fastllava/eval/scorers.py.

`read_jsonl`, `read_json` and `read_questions` are shared with the POPE and ScienceQA tasks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..scorers import gqa_prediction, normalize_vqa_answer, textvqa_question, vqa_accuracy
from .base import EvalDataError, EvalQuestion, Task

log = logging.getLogger(__name__)

_QUESTION_FIELDS = ("question_id", "image", "text")


def read_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each line of a jsonl file; `what` names the file in errors."""
    if not path.is_file():
        raise EvalDataError(path, None, f"missing {what}")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(path, number, f"expected one JSON object per line ({what}): {e.msg}") from None
            if not isinstance(obj, dict):
                raise EvalDataError(path, number, f"expected a JSON object ({what}), got {type(obj).__name__}")
            yield number, obj


def read_questions(path: Path, image_dir: Path, *, key: Callable[[dict], Any] | None = None,
                   what: str = "LLaVA question file") -> list[tuple[int, dict, Path]]:
    """(line number, record, image path) per line of a LLaVA question jsonl.

    Checks what LLaVA's loader relies on: question_id, image and text present, the image file present
    under `image_dir`, and `key(record)` (default: question_id) unique in the file; a ValueError from
    `key` becomes an EvalDataError naming the line.
    """
    key = key or (lambda rec: rec["question_id"])
    seen: dict[Any, int] = {}
    rows = []
    for number, rec in read_jsonl(path, what):
        missing = [name for name in _QUESTION_FIELDS if name not in rec]
        if missing:
            raise EvalDataError(path, number, f"expected the fields {', '.join(_QUESTION_FIELDS)}; "
                                              f"missing {', '.join(missing)}")
        for name in ("image", "text"):
            if not isinstance(rec[name], str):
                raise EvalDataError(path, number, f'expected "{name}" to be a string, got {type(rec[name]).__name__}')
        try:
            k = key(rec)
        except ValueError as e:  # the task's key could not be read from the record
            raise EvalDataError(path, number, f"question {rec['question_id']!r}: {e}") from None
        if k in seen:
            raise EvalDataError(path, number, f"duplicate question {k!r} (first on line {seen[k]})")
        seen[k] = number
        image = image_dir / rec["image"]
        if not image.is_file():
            raise EvalDataError(path, number, f"image {rec['image']!r} not found: expected the file {image}")
        rows.append((number, rec, image))
    return rows


def read_json(path: Path, kind: type) -> Any:
    """A whole-file JSON document of type `kind`; errors name the file and the line of a syntax error."""
    if not path.is_file():
        raise EvalDataError(path, None, "missing file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalDataError(path, e.lineno, f"expected a JSON document: {e.msg}") from None
    if not isinstance(obj, kind):
        raise EvalDataError(path, None, f"expected a JSON {kind.__name__}, got {type(obj).__name__}")
    return obj


def _check_answers(questions: Sequence[EvalQuestion], answers: Sequence[str]) -> None:
    if len(questions) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


class VQAv2(Task):
    """VQAv2 test-dev (answers scored by the EvalAI server only).

    Layout (under --data, LLaVA's playground/data/eval):
      vqav2/llava_vqav2_mscoco_test-dev2015.jsonl  the questions answered (from LLaVA's eval.zip)
      vqav2/llava_vqav2_mscoco_test2015.jsonl      every test2015 question: the upload must list them all
      vqav2/test2015/<image>                       COCO test2015 images
    score() writes answers_upload/llava_vqav2_mscoco_test-dev2015.json: [{"question_id", "answer"}] for
    every test2015 question, answers normalized as EvalAI does and "" where unanswered
    (scripts/convert_vqav2_for_submission.py), and returns {}.
    """

    name = "vqav2"
    max_new_tokens = 128
    # LLaVA's MODEL_ZOO.md: EvalAI test-dev accuracy of the upload file (not computable locally).
    published = {"llava-v1.5-7b": {"accuracy": 78.5}, "llava-v1.5-13b": {"accuracy": 80.0}}
    split = "llava_vqav2_mscoco_test-dev2015"
    full_split = "llava_vqav2_mscoco_test2015"

    def load(self, data_dir: Path) -> list[EvalQuestion]:
        root = Path(data_dir) / "vqav2"
        full = root / f"{self.full_split}.jsonl"
        # Checked now, not after hours of generation: the upload cannot be written without it.
        if not full.is_file():
            raise EvalDataError(full, None, "missing LLaVA's list of all test2015 questions, needed for the "
                                            "EvalAI upload file (it ships in LLaVA's eval.zip)")
        rows = read_questions(root / f"{self.split}.jsonl", root / "test2015")
        return [EvalQuestion(rec["question_id"], rec["text"], [image], truth={"full_split": str(full)})
                for _, rec, image in rows]

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        _check_answers(questions, answers)
        if not questions:
            return {}
        given = {q.question_id: a for q, a in zip(questions, answers)}
        full = Path(questions[0].truth["full_split"])
        upload = []
        for number, rec in read_jsonl(full, "LLaVA's list of all test2015 questions"):
            if "question_id" not in rec:
                raise EvalDataError(full, number, "expected a question_id field")
            qid = rec["question_id"]
            # convert_vqav2_for_submission.py: normalized answer, or "" for a question not answered.
            upload.append({"question_id": qid, "answer": normalize_vqa_answer(given[qid]) if qid in given else ""})
        covered = sum(1 for row in upload if row["question_id"] in given)
        if covered != len(given):
            log.warning("vqav2: %d answered questions are not in %s and are left out of the upload",
                        len(given) - covered, full)
        path = Path(output_dir) / "answers_upload" / f"{self.split}.json"
        _write_json(path, upload)
        log.info("vqav2: wrote %s (%d answers for %d test2015 questions); no local score: submit it to the "
                 "VQAv2 EvalAI server (test-dev phase)", path, covered, len(upload))
        return {}


class VizWiz(Task):
    """VizWiz-VQA test (answers scored by the EvalAI server only).

    Layout: vizwiz/llava_test.jsonl (LLaVA's eval.zip), vizwiz/test/<image>.
    score() writes answers_upload/vizwiz_test.json: [{"image", "answer"}] per question of llava_test.jsonl,
    answers normalized as EvalAI does (scripts/convert_vizwiz_for_submission.py), and returns {}.
    """

    name = "vizwiz"
    max_new_tokens = 128
    # LLaVA's MODEL_ZOO.md: EvalAI test-dev accuracy of the upload file (not computable locally).
    published = {"llava-v1.5-7b": {"accuracy": 50.0}, "llava-v1.5-13b": {"accuracy": 53.6}}

    def load(self, data_dir: Path) -> list[EvalQuestion]:
        root = Path(data_dir) / "vizwiz"
        path = root / "llava_test.jsonl"
        rows = read_questions(path, root / "test")
        return [EvalQuestion(rec["question_id"], rec["text"], [image], truth={"image": rec["image"], "file": str(path)})
                for _, rec, image in rows]

    def score(self, questions: Sequence[EvalQuestion], answers: Sequence[str], output_dir: Path) -> dict[str, float]:
        _check_answers(questions, answers)
        if not questions:
            return {}
        upload = [{"image": q.truth["image"], "answer": normalize_vqa_answer(a)} for q, a in zip(questions, answers)]
        path = Path(output_dir) / "answers_upload" / "vizwiz_test.json"
        _write_json(path, upload)
        # LLaVA's converter asserts every question is answered; say so when some are not (e.g. --limit).
        total = sum(1 for _ in read_jsonl(Path(questions[0].truth["file"]), "LLaVA question file"))
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

    def load(self, data_dir: Path) -> list[EvalQuestion]:
        root = Path(data_dir) / "gqa"
        path = root / "llava_gqa_testdev_balanced.jsonl"
        rows = read_questions(path, root / "data" / "images")
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

    def load(self, data_dir: Path) -> list[EvalQuestion]:
        root = Path(data_dir) / "textvqa"
        path = root / "llava_textvqa_val_v051_ocr.jsonl"

        def key(rec: dict) -> tuple:  # what eval_textvqa.py looks annotations up by
            return rec["question_id"], textvqa_question(rec["text"])

        rows = read_questions(path, root / "train_images", key=key)
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
        accuracy = 100.0 * sum(vqa_accuracy(a, q.truth["answers"]) for q, a in zip(questions, answers)) / len(questions)
        log.info("textvqa: samples %d, accuracy %.2f%%", len(questions), accuracy)
        return {"accuracy": accuracy}

